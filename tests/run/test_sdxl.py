"""SDXL runs end to end on the tiny SDXL model: batches, size conditioning, Highres fix, metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gen_img
from library.models import load_model
from library.records.jobs import Job
from library.records.size_conditioning import SizeConditioning
from library.sampling.highres_fix import HighresFix, HighresSettings
from library.sampling.patches import FixedFeature, Patch
from tests.helpers import assert_override_stays_on_its_line, make_pipeline, meta, pixels, pngs, run

FAST = ["--steps", "3", "--W", "64", "--H", "64"]


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    return load_model(str(tiny_models["sdxl-diffusers"]))


def _job(seed: int, **extra) -> Job:
    return Job(**{"prompt": f"a cat number {seed}", "negative_prompt": "dog", "seed": seed, "width": 64,
                  "height": 64, "steps": 3, "scale": 6.0, **extra})


class AddedKwargs(Patch):
    """Records the `added_cond_kwargs` of every U-Net call (the rows' pooled vectors and size numbers)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.calls.append({"time_ids": cond.time_ids.clone(), "pooled": cond.pooled.clone(), "size": sample.shape})
        return None


def test_batch_of_three_equals_three_batches_of_one(sdxl):
    pipeline = make_pipeline(sdxl, "euler_a")
    jobs = [_job(1), _job(2), _job(3)]
    together = pipeline.latents(jobs)
    alone = torch.cat([pipeline.latents([job]) for job in jobs])
    assert ((together - alone).abs().max() / together.abs().max()).item() < 1e-5
    sizes = SizeConditioning(original_height=128, crop_left=8)
    assert not torch.equal(pipeline.latents([_job(2, sizes=sizes)]), alone[1:2])  # the sizes reach the U-Net


def test_every_row_gets_its_pooled_vector_and_size_numbers(sdxl):
    recorder = AddedKwargs()
    pipeline = make_pipeline(sdxl, "ddim", FixedFeature(recorder))
    sizes = SizeConditioning(original_height=96, original_width=80, original_height_negative=40,
                             original_width_negative=48, crop_top=8, crop_left=16)
    pipeline.latents([_job(1, sizes=sizes), _job(2, sizes=sizes)])
    ids = recorder.calls[0]["time_ids"].tolist()
    assert ids == [[40, 48, 8, 16, 64, 64]] * 2 + [[96, 80, 8, 16, 64, 64]] * 2  # [negative rows, prompt rows]
    pooled = recorder.calls[0]["pooled"]
    negatives = pipeline.encoder.conditioning(["dog", "dog"], 1).pooled  # encoded as the loop encodes them
    prompts = pipeline.encoder.conditioning(["a cat number 1", "a cat number 2"], 1).pooled
    assert torch.equal(pooled, torch.cat([negatives, prompts]))


@pytest.mark.parametrize("latents_upscaling", [None, "bilinear"])
def test_highres_fix_first_stage_scales_the_sizes(sdxl, latents_upscaling):
    recorder = AddedKwargs()
    pipeline = make_pipeline(sdxl, "ddim", FixedFeature(recorder))
    highres = HighresFix(HighresSettings(0.5, steps=2, latents_upscaling=latents_upscaling))
    sizes = SizeConditioning(original_height=301, original_width=200, crop_top=7)
    highres.generate(pipeline, [_job(1, width=128, height=128, sizes=sizes, strength=0.5)], 1)
    first, last = recorder.calls[0], recorder.calls[-1]
    assert first["size"][-2:] == (8, 8) and last["size"][-2:] == (16, 16)
    # int(x * 0.5 + 0.5): 301 -> 151, 200 -> 100, 7 -> 4; the target is the 1st stage's size
    assert first["time_ids"].tolist()[1] == [151, 100, 4, 0, 64, 64]
    assert last["time_ids"].tolist()[1] == [301, 200, 7, 0, 128, 128]
    recorder.calls.clear()  # a line's --hfs scales them by its own scale
    highres.generate(pipeline, [_job(1, width=128, height=128, sizes=sizes, strength=0.5, highres_scale=0.25)], 1)
    assert recorder.calls[0]["time_ids"].tolist()[1] == [75, 50, 2, 0, 32, 32]  # int(x * 0.25 + 0.5)


def test_size_prompt_options_reach_only_their_own_images(tiny_models, tmp_path):
    assert_override_stays_on_its_line(tiny_models, tmp_path, ["--seed", "1"], "--oh 256 --ow 32 --ct 16",
                                      kind="sdxl-diffusers")


def test_png_keys_and_parameters(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "o", "--prompt", "a cat --oh 512 --ct 8 --n blur", "--original_width", "300",
               "--crop_left", "4", "--original_height_negative", "100", kind="sdxl-diffusers") == 0
    (png,) = pngs(tmp_path / "o")
    keys = meta(png)
    assert [keys[k] for k in ("original-height", "original-width", "original-height-negative",
                              "original-width-negative", "crop-top", "crop-left")] == ["512", "300", "100", "300",
                                                                                      "8", "4"]
    assert "Size: 64x64" in keys["parameters"] and "Negative prompt: blur" in keys["parameters"]


def test_default_size_is_1024_and_clip_skip_2(sdxl):
    from library.cli.parser import parse_options
    from library.records.options import for_model
    from library.run.build import prompt_encoder

    options = parse_options(["--prompt", "x"])
    assert (options.generation.width, options.generation.height) == (512, 512)  # before the model is known
    sized = for_model(options, "sdxl").generation
    assert (sized.width, sized.height, sized.width_given) == (1024, 1024, False)
    given = for_model(parse_options(["--prompt", "x", "--W", "64"]), "sdxl").generation
    assert (given.width, given.height) == (64, 1024)
    assert for_model(options, "sd1") is options
    encoder = prompt_encoder(options.text, sdxl)
    assert (encoder.first.clip_skip, encoder.second.clip_skip) == (2, 2)
    assert not encoder.first.final_layer_norm and not encoder.second.final_layer_norm and encoder.second.pooled


def test_prompt_file_n_iter_skip_existing_and_v_prediction(tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --d 1 --ow 96\na dog BREAK a hat --d 2 --n (blur:1.3)\n")
    common = ["--from_file", str(prompts), "--n_iter", "2", "--sequential_file_name", "--max_embeddings_multiples",
              "3", "--sampler", "k_euler_a"]
    assert run(tiny_models, tmp_path / "o", *common, kind="sdxl-diffusers") == 0
    assert len(pngs(tmp_path / "o")) == 4
    before = {p.name: pixels(p) for p in pngs(tmp_path / "o")}
    assert run(tiny_models, tmp_path / "o", *common, "--skip_existing", kind="sdxl-diffusers") == 0
    assert {p.name: pixels(p) for p in pngs(tmp_path / "o")}.keys() == before.keys()
    assert run(tiny_models, tmp_path / "v", "--prompt", "a cat", "--v_parameterization", "--zero_terminal_snr",
               kind="sdxl-diffusers") == 0
    (png,) = pngs(tmp_path / "v")
    assert pixels(png).std() > 0


def test_interactive_mode(tiny_models, tmp_path, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --ct 8 --nl 2\n"))  # with a negative scale: 3 rows
    assert gen_img.main(["--ckpt", str(tiny_models["sdxl-diffusers"]), "--outdir", str(tmp_path / "o"), *FAST,
                         "--interactive", "--no_preview"]) == 0
    (png,) = pngs(tmp_path / "o")
    assert meta(png)["crop-top"] == "8" and meta(png)["negative-scale"] == "2.0"


def test_img2img_and_inpainting(tiny_models, tmp_path):
    from tests.helpers import make_source

    source = make_source(tmp_path / "src" / "a.png")
    mask = make_source(tmp_path / "mask" / "a.png", mode="L")
    assert run(tiny_models, tmp_path / "i", "--prompt", "a cat", "--image_path", str(source), "--strength", "0.5",
               kind="sdxl-diffusers") == 0
    assert run(tiny_models, tmp_path / "m", "--prompt", "a cat", "--image_path", str(source), "--mask_path",
               str(mask), "--strength", "0.5", kind="sdxl-diffusers") == 0
    (plain,), (masked,) = pngs(tmp_path / "i"), pngs(tmp_path / "m")
    assert np.abs(pixels(plain) - pixels(masked)).max() > 0


def test_each_kind_of_sampler_runs(sdxl):
    """One sampler of each scheduler class (the loop passes the added conditioning the same way to all)."""
    for sampler in ("ddim", "lms", "euler_a", "dpmsolver++", "unipc", "lcm", "euler_karras"):
        job = _job(5, steps=2)
        latents = make_pipeline(sdxl, sampler).latents([job])
        assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all(), sampler


def test_an_sdxl_embedding_reaches_both_encoders(tiny_models, sdxl):
    from pathlib import Path

    from library.records.options import TextOptions
    from library.run.build import prompt_encoder

    path = tiny_models["embedding-sdxl"]
    encoder = prompt_encoder(TextOptions(None, None, "original", (str(path),), ()), sdxl)
    word = Path(path).stem
    with_word = encoder.conditioning([f"a {word} cat"], 1)
    plain = prompt_encoder(TextOptions(None, None, "original", (), ()), sdxl).conditioning([f"a {word} cat"], 1)
    width_l = sdxl.text_encoder.config.hidden_size
    assert (with_word.states[..., :width_l] - plain.states[..., :width_l]).abs().max() > 0  # CLIP-L's half
    assert (with_word.states[..., width_l:] - plain.states[..., width_l:]).abs().max() > 0  # bigG's half
    assert (with_word.pooled - plain.pooled).abs().max() > 0


def test_single_file_and_diffusers_folder_give_the_same_image(tiny_models, tmp_path):
    for kind in ("sdxl", "sdxl-diffusers"):
        assert run(tiny_models, tmp_path / kind, "--prompt", "a cat --n blur", "--seed", "5", kind=kind) == 0
    (single,), (folder,) = pngs(tmp_path / "sdxl"), pngs(tmp_path / "sdxl-diffusers")
    assert np.array_equal(pixels(single), pixels(folder))
    assert pixels(single).std() > 0
