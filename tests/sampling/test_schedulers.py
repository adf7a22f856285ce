"""Every sampler on every tiny model kind; scheduler configuration as the original's."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models import load_model
from library.records.jobs import Job
from library.records.samplers import noises_per_step, resolve, sampler_names
from library.sampling.schedulers import make_scheduler
from tests.helpers import make_pipeline


@pytest.fixture(scope="module")
def models(tiny_models):
    return {kind: load_model(str(tiny_models[kind])) for kind in ("sd1", "sd2", "sd2-v")}


def test_sampler_names_cover_the_manual_and_more():
    names = set(sampler_names())
    manual = {"ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
              "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"}
    assert manual <= names
    assert {"unipc", "lcm", "dpmsolver++_karras", "euler_karras"} <= names


def test_scheduler_config_follows_the_original():
    s = make_scheduler("ddim", v_prediction=True)
    assert type(s).__name__ == "DDIMScheduler"
    c = s.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert (c.steps_offset, c.clip_sample, c.prediction_type) == (1, False, "v_prediction")
    k = make_scheduler("dpmsolver++_karras", v_prediction=False)
    assert type(k).__name__ == "DPMSolverMultistepScheduler"
    assert k.config.use_karras_sigmas and k.config.algorithm_type == "dpmsolver++"
    assert k.config.prediction_type == "epsilon"
    assert type(make_scheduler("k_euler_a", False)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("dpmsolver", False).config.algorithm_type == "dpmsolver"
    assert noises_per_step("dpm_2_a") == 2 and noises_per_step("k_dpm_2_a") == 2 and noises_per_step("euler_a") == 1


def test_unknown_sampler_is_a_user_error_listing_choices():
    with pytest.raises(UserError, match=r"--sampler foo: unknown sampler; choose one of ddim, pndm"):
        resolve("foo")
    with pytest.raises(UserError, match="unknown sampler"):
        resolve("euler_a_karras")  # the class has no Karras sigmas


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2-v"])
def test_every_sampler_gives_finite_images_at_two_sizes(models, kind):
    model = models[kind]
    for sampler in sampler_names():
        pipeline = make_pipeline(model, sampler)
        for width, height in ((64, 64), (96, 64)):
            job = Job("a photo of a cat", "blurry", seed=3, width=width, height=height, steps=4, scale=5.0)
            latents = pipeline.latents([job])
            images = pipeline.decode(latents, 1)
            assert images.shape == (1, 3, height, width), sampler
            assert torch.isfinite(images).all(), f"{kind} {sampler} {width}x{height}"
            assert latents.abs().max() < 1e4, sampler
