"""Gradual Latent: the size schedule, the unsharp mask, the resize step, the command line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.prompts.line_options import parse_prompt_line
from library.records.gradual_latent_settings import GradualLatent, Unsharp, parse_unsharp, with_overrides
from library.records.jobs import Job
from library.sampling.patches import FixedFeature, Patch
from library.sampling.schedulers import make_scheduler
from tests.helpers import assert_override_stays_on_its_line, make_pipeline, pixels, pngs, run


def _timesteps(steps: int) -> list[int]:
    scheduler = make_scheduler("euler_a", False)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("steps,start,latent,expected", [
    # the original's worked schedules
    (20, 750, (64, 64), ((32, 32), {5: (40, 40), 8: (48, 48), 11: (56, 56), 14: (64, 64)})),
    (30, 750, (64, 96), ((32, 48), {8: (40, 56), 11: (48, 72), 14: (56, 80), 17: (64, 96)})),
    (28, 650, (80, 80), ((40, 40), {10: (48, 48), 13: (56, 56), 16: (64, 64), 19: (80, 80)})),
])
def test_size_schedule_is_the_formula(steps, start, latent, expected):
    assert GradualLatent(start).sizes(_timesteps(steps), *latent) == expected


def test_at_ratio_1_a_side_not_divisible_by_8_is_kept():
    start, resizes = GradualLatent(750).sizes(_timesteps(20), 60, 60)
    assert start == (30, 30) and resizes[14] == (60, 60)  # the original ends at 56 (448 px for 480)


def test_unsharp_against_a_direct_computation():
    x = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(0))
    u = Unsharp(3, 0.5, 0.7)
    taps = torch.tensor([np.exp(-0.5 * (j / 0.5) ** 2) for j in (-1, 0, 1)], dtype=torch.float32)
    taps = taps / taps.sum()
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    blurred = torch.zeros_like(x)
    for a in range(3):
        for b in range(3):
            blurred += taps[a] * taps[b] * padded[:, :, a : a + 9, b : b + 11]
    assert torch.allclose(u(x), x + 0.7 * (x - blurred), atol=1e-6)


def test_unsharp_parameters():
    assert parse_unsharp("3,0.5,0.5,1") == Unsharp(3, 0.5, 0.5, True)
    assert parse_unsharp("3,1.0,1.0,0") == Unsharp(3, 1.0, 1.0, False)
    assert parse_unsharp("5,1,2") == Unsharp(5, 1.0, 2.0, True)
    for bad in ("3,1", "4,1,1", "x,1,1", "3,0,1"):
        with pytest.raises(Exception, match="--gradual_latent_unsharp_params"):
            parse_unsharp(bad)


def test_prompt_overrides():
    base = GradualLatent(750, ratio=0.5)
    over = lambda text, b=base: with_overrides(b, parse_prompt_line("x " + text).overrides, None)  # noqa: E731
    assert over("") is base
    assert over("--glr 0.25") == GradualLatent(750, ratio=0.25)
    assert over("--gle 2", None) == GradualLatent(650, every_n_steps=2)  # no --glt anywhere: 650
    assert over("--glt 800 --glsn 0.5") == GradualLatent(800, s_noise=0.5)


class StepSizes(Patch):
    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def after_step(self, ctx, latents):
        self.sizes.append(tuple(latents.shape[-2:]))
        return latents


def _latents(model, settings, seeds=(5,), steps=8, size=256, record=None, height=None):
    pipeline = make_pipeline(model, "euler_a")
    from library.features.gradual_latent import GradualLatentFeature

    pipeline.patches.add(GradualLatentFeature("euler_a"))
    if record is not None:
        pipeline.patches.add(FixedFeature(record))
    jobs = [Job("a cat", "", seed=s, width=size, height=height or size, steps=steps, scale=5.0, gradual_latent=settings)
            for s in seeds]
    return pipeline.latents(jobs)


@pytest.mark.parametrize("width,height", [(512, 512), (768, 512)])
def test_recorded_sizes_per_step_follow_the_schedule(sd1, width, height):
    record = StepSizes()
    settings = GradualLatent(750, every_n_steps=2)
    out = _latents(sd1, settings, steps=12, size=width, height=height, record=record)
    start, resizes = settings.sizes(_timesteps(12), height // 8, width // 8)
    assert start == (height // 16, width // 16) and resizes[9] == (height // 8, width // 8)
    expected, size = [], start
    for i in range(12):
        size = resizes.get(i, size)
        expected.append(size)
    assert record.sizes == expected and tuple(out.shape[-2:]) == (height // 8, width // 8)


def test_ratio_1_is_plain_euler_a_and_batches_do_not_change_images(sd1):
    plain = _latents(sd1, None, seeds=(5, 6, 7))
    assert torch.equal(_latents(sd1, GradualLatent(750, ratio=1.0), seeds=(5, 6, 7)), plain)
    grown = _latents(sd1, GradualLatent(750), seeds=(5, 6, 7))
    alone = torch.cat([_latents(sd1, GradualLatent(750), seeds=(s,)) for s in (5, 6, 7)])
    # equal up to float rounding of batched kernels (noise from another stream would differ by O(1))
    assert (grown - alone).abs().max() <= 1e-5 * grown.abs().max()
    assert (grown - plain).abs().max() > 1e-2


def test_a_schedule_that_ends_small_finishes_at_full_size_with_a_warning(sd1, caplog):
    record = StepSizes()
    with caplog.at_level(logging.WARNING, logger="library.features.gradual_latent"):
        out = _latents(sd1, GradualLatent(300), steps=4, record=record)
    assert out.shape[-2:] == (32, 32) and record.sizes == [(16, 16), (16, 16), (16, 16), (32, 32)]
    assert [r.getMessage() for r in caplog.records] == [
        "Gradual Latent: 4 steps from timestep 300 do not reach the full latent size 32x32 (the schedule ends "
        "at 16x16); the last step resizes to it"]


FAST_GL = ["--W", "128", "--H", "128", "--steps", "6", "--sampler", "euler_a", "--seed", "3"]


def test_a_prompt_override_applies_to_its_line_only(tiny_models, tmp_path):
    assert_override_stays_on_its_line(tiny_models, tmp_path, FAST_GL, "--glt 800 --glr 0.5")


@pytest.mark.parametrize("extra", [
    ["--network_module", "networks.lora", "--network_weights", "{lora}"],
    ["--image_path", "{source}", "--strength", "0.8"],
    ["--image_path", "{source}", "--mask_path", "{mask}", "--strength", "0.8"],
    ["--highres_fix_scale", "0.5", "--highres_fix_steps", "6", "--strength", "0.8"],
    ["--ds_depth_1", "1", "--ds_timesteps_1", "500"],
    ["--control_net_models", "{controlnet}", "--guide_image_path", "{source}"],
])
def test_composes_and_batches_do_not_change_images(tiny_models, tmp_path, extra):
    from PIL import Image

    rng = np.random.default_rng(0)
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(source)
    mask_pixels = np.zeros((128, 128), np.uint8)
    mask_pixels[:, 64:] = 255
    Image.fromarray(mask_pixels).save(mask)
    extra = [e.format(lora=tiny_models["lora"], source=source, mask=mask, controlnet=tiny_models["controlnet-sd1"])
             for e in extra]
    common = [*FAST_GL, "--prompt", "a cat --d 5,6", "--images_per_prompt", "2", "--sequential_file_name", *extra]
    gl = ["--gradual_latent_timesteps", "900"]
    assert run(tiny_models, tmp_path / "b1", *common, *gl) == 0
    assert run(tiny_models, tmp_path / "b2", *common, *gl, "--batch_size", "2") == 0
    assert run(tiny_models, tmp_path / "plain", *common) == 0
    one, two, plain = (sorted(pngs(tmp_path / d))[-1] for d in ("b1", "b2", "plain"))
    assert np.abs(pixels(one) - pixels(two)).max() <= 1
    assert np.abs(pixels(one) - pixels(plain)).max() > 0


def test_controlnet_hint_features_follow_the_latent_size(tiny_models, tmp_path, monkeypatch):
    """With Gradual Latent the ControlNet runs on small latents: its hint features are resized
    (bicubic, as the original) to every size the schedule makes, and its residuals fit the U-Net."""
    from library.features import controlnet

    sizes = []
    sized = controlnet.sized_hint_features

    def recording(features, size):
        sizes.append(tuple(size))
        return sized(features, size)

    monkeypatch.setattr(controlnet, "sized_hint_features", recording)
    source = tmp_path / "guide.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    assert run(tiny_models, tmp_path / "out", *FAST_GL, "--steps", "20", "--prompt", "a cat --d 5",
               "--gradual_latent_timesteps", "900", "--control_net_models", str(tiny_models["controlnet-sd1"]), "--guide_image_path",
               str(source)) == 0
    assert sizes[0] == (8, 8) and sizes[-1] == (16, 16)  # from ratio 0.5 up to the 128x128 image's latent
    features = torch.randn(1, 4, 8, 8)
    resized = controlnet.sized_hint_features(features, (5, 6))
    assert torch.allclose(resized, torch.nn.functional.interpolate(features, size=(5, 6), mode="bicubic"))
    assert controlnet.sized_hint_features(features, (8, 8)) is None  # at full size: unchanged


def test_the_batch_never_steps_the_scheduler(sd1, monkeypatch):
    """Gradual Latent makes every step itself (its own step index into the scheduler's sigmas):
    no `scheduler.step`, no `scale_model_input`, and inpainting's noise level does not need them."""
    from diffusers import EulerAncestralDiscreteScheduler

    calls = []
    for name in ("step", "scale_model_input"):
        original = getattr(EulerAncestralDiscreteScheduler, name)
        monkeypatch.setattr(EulerAncestralDiscreteScheduler, name,
                            lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    out = _latents(sd1, GradualLatent(750), steps=4, size=128)
    assert calls == [] and out.shape[-2:] == (16, 16)
    _latents(sd1, None, steps=4, size=128)
    assert calls == ["scale_model_input", "step"] * 4
