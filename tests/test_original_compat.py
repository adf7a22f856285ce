"""The original's scripts run unchanged and give the original's images (issue 15): the img2img
start rule, the options of the original's command line, prompt options, seeds and metadata."""

from __future__ import annotations

import pytest
import torch

from library import pipeline as pipeline_module
from library.img2img import Img2ImgInput, StartIndices, start_indices
from library.jobs import Job
from library.models import load_model
from library.pipeline import Pipeline
from tests.helpers import make_generator, make_source, meta, pngs, run, run_img2img


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["sd1"]))


@pytest.fixture
def schedule_log(monkeypatch):
    """Each loop of a run as {"noised": [timesteps add_noise got, in order], "ran": [timesteps run]}."""
    log: list[dict] = []
    real_make = pipeline_module.make_scheduler

    def make(*args, **kwargs):
        scheduler = real_make(*args, **kwargs)
        real_add = scheduler.add_noise
        entry = {"noised": [], "ran": [], "scheduler": scheduler}
        log.append(entry)

        def add_noise(x, noise, t):
            out = real_add(x, noise, t)
            entry["noised"].append((int(t.reshape(-1)[0]), x, noise, out))
            return out

        scheduler.add_noise = add_noise
        return scheduler

    real_denoise = Pipeline._denoise

    def denoise(self, batch, guidance, latents, step_kwargs):
        log[-1]["ran"] = [int(t) for t in batch.timesteps]
        return real_denoise(self, batch, guidance, latents, step_kwargs)

    monkeypatch.setattr(pipeline_module, "make_scheduler", make)
    monkeypatch.setattr(Pipeline, "_denoise", denoise)
    return log


# --- img2img start ----------------------------------------------------------------------------------

DDIM_10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_start_rule_indices():
    # init = min(int(steps * strength) + offset, steps); noised at [-init]; runs [steps - init + offset:]
    assert start_indices(10, 0.6, 1) == StartIndices(noise=3, begin=4)
    assert start_indices(10, 0.6, 0) == StartIndices(noise=4, begin=4)
    assert start_indices(10, 0.0, 1) == StartIndices(noise=9, begin=10)  # noised at the last timestep, no step
    assert start_indices(10, 0.0, 0) == StartIndices(noise=None, begin=10)  # the source as it is
    assert start_indices(10, 0.95, 1) == StartIndices(noise=0, begin=1)  # init capped at steps
    assert start_indices(10, 1.0, 1) == StartIndices(noise=None, begin=0)  # strength 1: pure noise, all steps
    # heun / dpm_2 (order 2): counted in whole sampler steps, both indices times the order
    assert start_indices(10, 0.6, 1, order=2) == StartIndices(noise=6, begin=8)


@pytest.mark.parametrize("zero_offset,noised,ran", [(False, 601, DDIM_10[4:]), (True, 501, DDIM_10[4:])])
def test_img2img_noises_at_the_7th_from_last_and_runs_the_last_6(tiny_models, tmp_path, schedule_log,
                                                                 zero_offset, noised, ran):
    src = make_source(tmp_path / "s.png")
    extra = ["--force_scheduler_zero_steps_offset"] if zero_offset else []
    assert run_img2img(tiny_models, tmp_path / "o", "--image_path", str(src), "--steps", "10", "--strength", "0.6",
                       "--prompt", "x --d 3", *extra) == 0
    (entry,) = schedule_log
    assert [t for t, *_ in entry["noised"]] == [noised]
    assert entry["ran"] == ran == [501, 401, 301, 201, 101, 1]
    assert DDIM_10[-7] == 601


@pytest.mark.parametrize("zero_offset,index", [(False, 3), (True, 4)])
def test_sigma_schedulers_noise_with_that_steps_sigma(model, schedule_log, zero_offset, index):
    gen = make_generator(model, "euler")
    gen.zero_steps_offset = zero_offset
    job = Job("x", "", seed=1, width=32, height=32, steps=10, scale=4.0, strength=0.6)
    gen.latents([job], Img2ImgInput(0.6, images=torch.zeros(1, 3, 32, 32)))
    (entry,) = schedule_log
    (t, x, noise, out), sigmas = entry["noised"][0], entry["scheduler"].sigmas
    assert t == int(entry["scheduler"].timesteps[index])
    assert torch.allclose(out, x + noise * sigmas[index])
    assert entry["ran"] == [int(v) for v in entry["scheduler"].timesteps[4:]]


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_second_order_samplers_run_whole_steps(model, schedule_log, sampler):
    gen = make_generator(model, sampler)
    job = Job("x", "", seed=1, width=32, height=32, steps=10, scale=4.0, strength=0.6)
    gen.latents([job], Img2ImgInput(0.6, images=torch.zeros(1, 3, 32, 32)))
    (entry,) = schedule_log
    timesteps = [int(v) for v in entry["scheduler"].timesteps]
    assert len(timesteps) == 19
    assert entry["noised"][0][0] == timesteps[6]  # step 3 (of 0..9) = index 6 of the doubled list
    assert entry["ran"] == timesteps[8:]  # steps 4..9: 6 steps, 11 U-Net calls
    assert len(entry["ran"]) == 11


@pytest.mark.parametrize("zero_offset,noised", [(False, 601), (True, 501)])
def test_highres_fix_2nd_stage_uses_the_same_rule(tiny_models, tmp_path, schedule_log, zero_offset, noised):
    extra = ["--force_scheduler_zero_steps_offset"] if zero_offset else []
    assert run(tiny_models, tmp_path / "o", "--W", "128", "--H", "128", "--steps", "10", "--strength", "0.6",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "4", "--prompt", "x --d 3", *extra) == 0
    first, second = schedule_log
    assert first["noised"] == [] and len(first["ran"]) == 4
    assert [t for t, *_ in second["noised"]] == [noised]
    assert second["ran"] == DDIM_10[4:]


# --- prompt options ---------------------------------------------------------------------------------


def test_unknown_and_sdxl_prompt_options_keep_the_line(tiny_models, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first --zz 3 --d 1\nsecond --ow 1024 --d 2\nthird --nl none --d 3\n")
    with caplog.at_level("WARNING"):
        assert run(tiny_models, tmp_path / "o", "--from_file", str(prompts), "--negative_scale", "2",
                   "--sequential_file_name") == 0
    files = pngs(tmp_path / "o")
    assert [meta(p)["prompt"] for p in files] == ["first", "second", "third"]
    assert [meta(p).get("negative-scale") for p in files] == ["2.0", "2.0", None]
    assert f'{prompts}:1: unknown prompt option --zz (in "--zz 3") ignored, the line runs without it' in caplog.text
    assert f"{prompts}:2: --ow ignored: SDXL models are not supported" in caplog.text
