"""The arithmetic of one sampler step, as pure functions on tensors and floats.

Two parameterizations of a noised latent (k-diffusion's and DDIM's):

* sigma space (Euler, Euler a, LMS, Heun, DPM2): ``x = x0 + sigma * eps``; the U-Net sees
  ``x / sqrt(sigma^2 + 1)``, the same sample at unit variance;
* alpha-bar space (DDIM, PNDM, DPM-Solver, ...): ``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps`` with
  ``a = alphas_cumprod[t]``; ``sigma = sqrt((1 - a) / a)`` links the two.

A v-prediction model outputs ``v = sqrt(a) * eps - sqrt(1 - a) * x0`` (of the unit-variance sample)
instead of eps. No scheduler object is used here: callers pass its public arrays (``sigmas``,
``alphas_cumprod``) and their step index. Formulas keep diffusers' order of operations, so with
the scheduler's own 0-d float32 sigmas the results are bit for bit its results.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Scalar = Tensor | float  # a 0-d tensor (a scheduler's sigma) or a Python float


# -- lookups --------------------------------------------------------------------------------------
def sigma_at(sigmas: Tensor, step: int, begin: int | None = 0) -> Tensor:
    """The noise level of loop step `step`: ``sigmas[begin + step]``.

    `begin` is the scheduler's begin index (img2img runs the schedule's tail; None: 0). The 0-d
    tensor is returned as it is, so that arithmetic with it is the scheduler's float32 arithmetic.
    """
    return sigmas[(begin or 0) + step]


def alpha_bar_at(alphas_cumprod: Tensor, timestep: float | Tensor) -> float:
    """``alphas_cumprod[t]``, the training schedule's signal fraction at timestep `t` (0..999)."""
    return float(alphas_cumprod[int(timestep)])


# -- sigma space ----------------------------------------------------------------------------------
def scale_input(x: Tensor, sigma: Scalar) -> Tensor:
    """The U-Net's input for sample `x` at noise level `sigma`: ``x / sqrt(sigma^2 + 1)`` (unit variance)."""
    return x / ((sigma**2 + 1) ** 0.5)


def denoised(x: Tensor, out: Tensor, sigma: Scalar, v_prediction: bool = False) -> Tensor:
    """The x0 estimate of sample `x` at `sigma` from the U-Net output `out` (k-diffusion's ``denoised``).

    eps prediction: ``x0 = x - sigma * eps``. v prediction (``c_skip = 1/(sigma^2+1)``,
    ``c_out = -sigma/sqrt(sigma^2+1)``): ``x0 = v * c_out + x * c_skip``.
    """
    if v_prediction:
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return x - sigma * out


def ancestral_sigmas(sigma: Scalar, sigma_next: Scalar) -> tuple[Scalar, Scalar]:
    """(sigma_down, sigma_up) of an ancestral step from `sigma` to `sigma_next` (k-diffusion's
    `get_ancestral_step`, eta 1): ``sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)``,
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, so that ``sigma_down^2 + sigma_up^2 = sigma_next^2``:
    a deterministic move to sigma_down plus fresh noise of sigma_up lands at the noise level sigma_next."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


Resize = Callable[[Tensor], Tensor]


def euler_ancestral_step(x: Tensor, x0: Tensor, sigma: Scalar, sigma_next: Scalar, noise: Tensor, *,
                         s_noise: float = 1.0, resize: Resize | None = None, sharpen: Resize | None = None,
                         resize_after_step: bool = False) -> Tensor:
    """One Euler ancestral step of `x` (at `sigma`, x0 estimate `x0`) to `sigma_next`.

    ``d = (x - x0) / sigma``, ``dt = sigma_down - sigma`` (`ancestral_sigmas`); the result is
    ``x + d * dt + noise * sigma_up * s_noise``, `noise` standard normal of the result's shape.

    With `resize` (Gradual Latent's enlarging step, R = resize, U = `sharpen` or the identity):
    ``U(R(x + d * dt))`` when `resize_after_step`, else ``U(R(x)) + R(d) * dt``; then the noise
    term is added at the new size. The result keeps the dtype arithmetic gives it (callers cast).
    """
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    d, dt = (x - x0) / sigma, sigma_down - sigma
    if resize is None:
        moved = x + d * dt
    else:
        sharpen = sharpen or (lambda v: v)
        moved = sharpen(resize(x + d * dt)) if resize_after_step else sharpen(resize(x)) + resize(d) * dt
    return moved + noise * sigma_up * s_noise


# -- alpha-bar space ------------------------------------------------------------------------------
def denoised_alpha_bar(x: Tensor, out: Tensor, alpha_bar: float, v_prediction: bool = False) -> Tensor:
    """The x0 estimate of a unit-variance sample ``x = sqrt(a) x0 + sqrt(1-a) eps`` (DDIM-style).

    eps prediction: ``x0 = (x - sqrt(1-a) * eps) / sqrt(a)``; v prediction: ``x0 = sqrt(a) * x - sqrt(1-a) * v``.
    """
    a = alpha_bar
    if v_prediction:
        return a**0.5 * x - (1 - a) ** 0.5 * out
    return (x - (1 - a) ** 0.5 * out) / a**0.5
