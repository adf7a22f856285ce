"""step_math: closed-form goldens with a dummy denoiser, and diffusers' Euler ancestral bit for bit.

The dummy model is data concentrated at one point x0*: its exact noise prediction at sample x and
noise level sigma is ``eps = (x - x0*) / sigma``, so the exact sampler trajectories are known.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from library.records.gradual_latent_settings import Unsharp
from library.sampling.schedulers import make_scheduler
from library.sampling.step_math import (
    alpha_bar_at,
    ancestral_sigmas,
    denoised,
    denoised_alpha_bar,
    euler_ancestral_step,
    scale_input,
    sigma_at,
)

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _point_eps(x: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact eps prediction of data concentrated at `target`."""
    return (x - target) / sigma


def _sigmas(steps: int = 10) -> torch.Tensor:
    scheduler = make_scheduler("euler_a", False)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


# -- x0 from eps and v ----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.03, 1.0, 14.6])
def test_eps_and_v_give_the_same_x0_in_sigma_space(sigma):
    x0, noise = _randn(2, 4, 5, 5, seed=1), _randn(2, 4, 5, 5, seed=2)
    x = x0 + sigma * noise
    a = 1 / (sigma**2 + 1)  # the alpha-bar of this noise level
    v = a**0.5 * noise - (1 - a) ** 0.5 * x0
    assert torch.allclose(denoised(x, noise, sigma), x0, rtol=0, atol=1e-12)
    assert torch.allclose(denoised(x, v, sigma, v_prediction=True), x0, rtol=0, atol=1e-12)
    # the U-Net's input is the same sample at unit variance: sqrt(a) x0 + sqrt(1-a) eps
    assert torch.allclose(scale_input(x, sigma), a**0.5 * x0 + (1 - a) ** 0.5 * noise, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha_bar", [0.0047, 0.5, 0.9991])
def test_eps_and_v_give_the_same_x0_in_alpha_bar_space(alpha_bar):
    x0, noise = _randn(1, 4, 6, 6, seed=3), _randn(1, 4, 6, 6, seed=4)
    a = alpha_bar
    x = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    v = a**0.5 * noise - (1 - a) ** 0.5 * x0
    assert torch.allclose(denoised_alpha_bar(x, noise, a), x0, rtol=0, atol=1e-10)
    assert torch.allclose(denoised_alpha_bar(x, v, a, v_prediction=True), x0, rtol=0, atol=1e-12)


def test_the_two_spaces_agree_at_sigma_sqrt_of_one_minus_a_over_a():
    a = 0.3
    sigma = ((1 - a) / a) ** 0.5
    x, out = _randn(1, 4, 3, 3, seed=5), _randn(1, 4, 3, 3, seed=6)
    for v in (False, True):
        # a sigma-space sample x is the unit-variance sample x * sqrt(a)
        assert torch.allclose(denoised(x, out, sigma, v), denoised_alpha_bar(x * a**0.5, out, a, v), atol=1e-12)


# -- the ancestral split --------------------------------------------------------------------------
def test_sigma_up_and_down_split_the_next_noise_level():
    sigmas = _sigmas(12).to(F64)
    for i in range(len(sigmas) - 1):
        down, up = ancestral_sigmas(sigmas[i], sigmas[i + 1])
        assert float(up**2 + down**2) == pytest.approx(float(sigmas[i + 1] ** 2), rel=1e-12, abs=1e-15)
        assert 0 <= float(down) <= float(sigmas[i + 1]) and 0 <= float(up) <= float(sigmas[i + 1])
    assert ancestral_sigmas(2.0, 0.0) == (0.0, 0.0)  # the last step: no noise, straight to x0
    down, up = ancestral_sigmas(2.0, 1.0)
    assert up == pytest.approx(0.75**0.5, rel=1e-15) and down == pytest.approx(0.5, rel=1e-15)


# -- the step on the point-data model ------------------------------------------------------------
def test_an_euler_step_lands_on_the_line_towards_the_data_point():
    target, x = _randn(1, 4, 4, 4, seed=7), 3.0 * _randn(1, 4, 4, 4, seed=8)
    sigma, sigma_next = 3.0, 1.5
    x0 = denoised(x, _point_eps(x, target, sigma), sigma)
    assert torch.allclose(x0, target, rtol=0, atol=1e-12)
    down, _ = ancestral_sigmas(sigma, sigma_next)
    out = euler_ancestral_step(x, x0, sigma, sigma_next, torch.zeros_like(x), s_noise=0.0)
    # x' - x0* = (x - x0*) * sigma_down / sigma: on the segment from x to x0*, at sigma_down's place
    assert torch.allclose(out, target + (x - target) * (down / sigma), rtol=0, atol=1e-12)


def test_a_deterministic_euler_ancestral_run_ends_at_the_data_point():
    target, noise = _randn(1, 4, 4, 4, seed=9), _randn(1, 4, 4, 4, seed=10)
    sigmas = _sigmas(10).to(F64)
    x, shrink = target + sigmas[0] * noise, 1.0
    for i in range(len(sigmas) - 1):
        x0 = denoised(x, _point_eps(x, target, sigmas[i]), sigmas[i])
        x = euler_ancestral_step(x, x0, sigmas[i], sigmas[i + 1], _randn(1, 4, 4, 4, seed=100 + i), s_noise=0.0)
        shrink *= float(ancestral_sigmas(sigmas[i], sigmas[i + 1])[0] / sigmas[i])
        if i < len(sigmas) - 2:  # every step scales the distance to x0* by sigma_down / sigma
            assert torch.allclose(x - target, shrink * sigmas[0] * noise, rtol=0, atol=1e-10)
    assert float(sigmas[-1]) == 0.0 and torch.allclose(x, target, rtol=0, atol=1e-12)


def test_s_noise_scales_only_the_fresh_noise():
    x, x0, noise = _randn(1, 4, 4, 4, seed=11), _randn(1, 4, 4, 4, seed=12), _randn(1, 4, 4, 4, seed=13)
    quiet = euler_ancestral_step(x, x0, 2.0, 1.0, noise, s_noise=0.0)
    half = euler_ancestral_step(x, x0, 2.0, 1.0, noise, s_noise=0.5)
    assert torch.allclose(half - quiet, noise * 0.75**0.5 * 0.5, rtol=0, atol=1e-12)


# -- Gradual Latent's resize variant --------------------------------------------------------------
def _bicubic(size):
    return lambda v: F.interpolate(v, size=size, mode="bicubic", align_corners=False)


@pytest.mark.parametrize("sharpen,after", [(None, False), (Unsharp(3, 0.5, 0.5, True), True),
                                           (Unsharp(3, 1.0, 1.0, False), False)])
def test_the_resize_step_of_a_constant_field_is_resize_then_step(sharpen, after):
    levels = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64).view(1, 4, 1, 1)
    x, x0 = levels.expand(1, 4, 8, 8) * 5.0, levels.expand(1, 4, 8, 8) * -0.5
    noise = _randn(1, 4, 12, 12, seed=14)
    resize = _bicubic((12, 12))
    grown = euler_ancestral_step(x, x0, 4.0, 2.5, noise, s_noise=0.8, resize=resize, sharpen=sharpen,
                                 resize_after_step=after)
    then = euler_ancestral_step(resize(x), resize(x0), 4.0, 2.5, noise, s_noise=0.8)
    assert grown.shape == (1, 4, 12, 12) and torch.allclose(grown, then, rtol=0, atol=1e-12)


def test_the_resize_variants_are_the_documented_formulas():
    x, x0, noise = _randn(1, 4, 6, 6, seed=15), _randn(1, 4, 6, 6, seed=16), _randn(1, 4, 9, 9, seed=17)
    resize, sharpen = _bicubic((9, 9)), Unsharp(3, 0.5, 0.5)
    sigma, sigma_next = 3.0, 2.0
    down, up = ancestral_sigmas(sigma, sigma_next)
    d, dt = (x - x0) / sigma, down - sigma
    after = euler_ancestral_step(x, x0, sigma, sigma_next, noise, s_noise=0.7, resize=resize, sharpen=sharpen,
                                 resize_after_step=True)
    before = euler_ancestral_step(x, x0, sigma, sigma_next, noise, s_noise=0.7, resize=resize, sharpen=sharpen)
    plain = euler_ancestral_step(x, x0, sigma, sigma_next, noise, s_noise=0.7, resize=resize)
    assert torch.allclose(after, sharpen(resize(x + d * dt)) + noise * up * 0.7, rtol=0, atol=1e-12)
    assert torch.allclose(before, sharpen(resize(x)) + resize(d) * dt + noise * up * 0.7, rtol=0, atol=1e-12)
    assert torch.allclose(plain, resize(x) + resize(d) * dt + noise * up * 0.7, rtol=0, atol=1e-12)
    assert (after - before).abs().max() > 1e-3  # the switch matters for a non-constant field


# -- against diffusers, bit for bit ---------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_euler_ancestral_step_is_diffusers_bit_for_bit(prediction, dtype):
    scheduler = make_scheduler("euler_a", prediction == "v_prediction")
    assert isinstance(scheduler, EulerAncestralDiscreteScheduler)
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas
    x = (_randn(2, 4, 6, 6, seed=18, dtype=torch.float32) * sigmas[0]).to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        out = _randn(2, 4, 6, 6, seed=30 + i, dtype=torch.float32).to(dtype)
        sigma, sigma_next = sigma_at(sigmas, i), sigma_at(sigmas, i + 1)
        assert torch.equal(scale_input(x, sigma), scheduler.scale_model_input(x, t))
        generators = [torch.Generator().manual_seed(50 + i), torch.Generator().manual_seed(60 + i)]
        expected = scheduler.step(out, t, x, generator=generators).prev_sample
        generators = [torch.Generator().manual_seed(50 + i), torch.Generator().manual_seed(60 + i)]
        noise = randn_tensor(out.shape, dtype=out.dtype, generator=generators)
        wide = x.float()
        got = euler_ancestral_step(wide, denoised(wide, out, sigma, prediction == "v_prediction"), sigma,
                                   sigma_next, noise).to(dtype)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (prediction, i)
        x = expected


def test_lookups_follow_the_schedulers_begin_index_and_training_schedule():
    scheduler = make_scheduler("euler_a", False)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(3)  # img2img: the loop runs the schedule's tail from index 3
    x = _randn(1, 4, 2, 2, dtype=torch.float32)
    assert torch.equal(scheduler.scale_model_input(x, scheduler.timesteps[3]), scale_input(x, sigma_at(scheduler.sigmas, 0, 3)))
    assert float(sigma_at(scheduler.sigmas, 2, 3)) == float(scheduler.sigmas[5])
    assert float(sigma_at(scheduler.sigmas, 2, None)) == float(scheduler.sigmas[2])
    a = scheduler.alphas_cumprod
    assert alpha_bar_at(a, torch.tensor(999)) == float(a[999]) and alpha_bar_at(a, 0.0) == float(a[0])
    # sigma schedulers' sigmas are the training schedule's sqrt((1 - a) / a) at their timesteps
    t = int(scheduler.timesteps[0])
    assert float(scheduler.sigmas[0]) == pytest.approx(((1 - alpha_bar_at(a, t)) / alpha_bar_at(a, t)) ** 0.5, rel=1e-5)
