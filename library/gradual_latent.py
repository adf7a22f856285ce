"""Gradual Latent: denoise small first, enlarge the latent step by step to the size asked for.

Written by hand (no library has it), with the original's semantics (`docs/deep_shrink.md`),
for `euler_a` / `k_euler_a` (another sampler is a one-line error):

* The starting latents (txt2img noise x init sigma; img2img the noised source) of latent size
  (Hl, Wl) are resized by ``scale_factor=ratio`` (bicubic, floor of the size), then unsharp-masked
  once if unsharp parameters are given.
* ``elapsed`` starts at 1000. At each step, if ``t < timesteps`` and the ratio is below 1 and
  ``elapsed >= every_n_steps``: the ratio grows by ``ratio_step`` (at most 1), the step's result
  is made at ``(int(Hl*ratio)//8*8, int(Wl*ratio)//8*8)`` (at ratio 1: (Hl, Wl); never smaller
  than the current size, which matters only for latents under 16), and ``elapsed`` restarts at
  0; then ``elapsed += 1``. The U-Net runs at the current size.
* A resize step of Euler ancestral: ``d = (x - x0)/sigma``, ``dt = sigma_down - sigma``; with
  ``target_x``: ``x' = U(R(x + d*dt)) + sigma_up*s_noise*eps``, otherwise
  ``x' = U(R(x)) + R(d)*dt + sigma_up*s_noise*eps``, R = bicubic resize by size, U = unsharp mask
  ``x + strength*(x - blur(x))`` (identity without parameters). eps is drawn at the new shape from
  each image's own stream, in order. Other steps are the plain Euler ancestral step.
* Beyond the original (which can end smaller than asked, e.g. 480 px ends at 448): when the
  schedule does not reach the full size, one warning says so and the last step resizes to it.
* Inpainting masks follow the latent size; Highres fix applies it to both stages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from library.deep_shrink import bicubic
from library.errors import UserError
from library.unet_patches import Batch, Patch, StepContext

logger = logging.getLogger(__name__)

SAMPLERS = ("euler_a", "k_euler_a")
PROMPT_DEFAULT_TIMESTEPS = 650  # a prompt that sets --glr/--gls/--gle/--glsn/--glus without --glt


@dataclass(frozen=True)
class Unsharp:
    """`--gradual_latent_unsharp_params ksize,sigma,strength[,target_x]`."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x + strength * (x - gaussian_blur(x))``: depthwise, reflect padding, normalised taps."""
        j = torch.arange(self.ksize, dtype=x.dtype, device=x.device) - (self.ksize - 1) / 2
        taps = torch.exp(-0.5 * (j / self.sigma) ** 2)
        taps = taps / taps.sum()
        kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, self.ksize, self.ksize)
        pad = self.ksize // 2
        blurred = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])
        return x + self.strength * (x - blurred)


def parse_unsharp(text: str | None, option: str = "--gradual_latent_unsharp_params") -> Unsharp | None:
    """``"3,0.5,0.5[,1]"`` -> Unsharp (ksize odd and at least 1; target_x 1 when left out)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    example = f'(e.g. {option} "3,0.5,0.5,1")'
    if len(parts) not in (3, 4):
        raise UserError(f'{option} "{text}": expected ksize,sigma,strength[,target_x] {example}')
    try:
        ksize, sigma, strength = int(float(parts[0])), float(parts[1]), float(parts[2])
        target_x = bool(int(parts[3])) if len(parts) == 4 else True
    except ValueError:
        raise UserError(f'{option} "{text}": expected numbers {example}') from None
    if ksize < 1 or ksize % 2 == 0 or not (math.isfinite(sigma) and sigma > 0) or not math.isfinite(strength):
        raise UserError(f'{option} "{text}": ksize must be odd and positive, sigma above 0 {example}')
    return Unsharp(ksize, sigma, strength, target_x)


@dataclass(frozen=True)
class GradualLatent:
    """One image's Gradual Latent settings."""

    timesteps: int
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Unsharp | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1 or not self.ratio_step > 0 or self.every_n_steps < 1:
            raise UserError(f"Gradual Latent: ratio {self.ratio} must be in (0, 1], ratio step {self.ratio_step} "
                            f"above 0, every-n-steps {self.every_n_steps} at least 1")

    def sizes(self, timesteps: list[int], height: int, width: int) -> tuple[tuple[int, int], dict[int, tuple[int, int]]]:
        """The starting size and {step index: size of that step's result} for a latent of (height, width)."""
        start = (math.floor(height * self.ratio), math.floor(width * self.ratio))
        ratio, elapsed, resizes, size = self.ratio, 1000, {}, start
        for i, t in enumerate(timesteps):
            if t < self.timesteps and ratio < 1.0 and elapsed >= self.every_n_steps:
                ratio = min(ratio + self.ratio_step, 1.0)
                rounded = (height, width) if ratio >= 1.0 else (int(height * ratio) // 8 * 8, int(width * ratio) // 8 * 8)
                size = resizes[i] = (max(rounded[0], size[0]), max(rounded[1], size[1]))  # never smaller
                elapsed = 0
            elapsed += 1
        return start, resizes


def with_overrides(base: GradualLatent | None, overrides, prompt_unsharp: Unsharp | None) -> GradualLatent | None:
    """A prompt line's settings: its `--glt --glr --gls --gle --glsn --glus` over the command line's."""
    o = overrides
    others = [o.gradual_latent_ratio, o.gradual_latent_ratio_step, o.gradual_latent_every_n_steps,
              o.gradual_latent_s_noise, prompt_unsharp]
    if o.gradual_latent_timesteps is None and all(v is None for v in others):
        return base
    start = base or GradualLatent(PROMPT_DEFAULT_TIMESTEPS)
    pick = lambda given, default: default if given is None else given  # noqa: E731
    return GradualLatent(
        timesteps=pick(o.gradual_latent_timesteps, start.timesteps),
        ratio=pick(o.gradual_latent_ratio, start.ratio),
        ratio_step=pick(o.gradual_latent_ratio_step, start.ratio_step),
        every_n_steps=pick(o.gradual_latent_every_n_steps, start.every_n_steps),
        s_noise=pick(o.gradual_latent_s_noise, start.s_noise),
        unsharp=pick(prompt_unsharp, start.unsharp),
    )


class GradualLatentFeature:
    """The patch owner's feature: batches whose Jobs have Gradual Latent settings get `GrowLatents`."""

    def __init__(self, sampler: str) -> None:
        self.sampler = sampler

    def check_job(self, job) -> None:
        if job.gradual_latent is None:
            return
        if self.sampler not in SAMPLERS:
            raise UserError(f"Gradual Latent works with --sampler euler_a or k_euler_a, not {self.sampler}")

    def for_batch(self, batch: Batch) -> "GrowLatents | None":
        settings = batch.jobs[0].gradual_latent
        if settings is None:
            return None
        layout = batch.layout
        timesteps = [int(t) for t in batch.timesteps]
        start, resizes = settings.sizes(timesteps, layout.latent_height, layout.latent_width)
        if min(start) < 1:
            raise UserError(f"Gradual Latent: a {layout.latent_width * 8}x{layout.latent_height * 8} image is too "
                            f"small to start at ratio {settings.ratio}")
        full = (layout.latent_height, layout.latent_width)
        final = resizes[max(resizes)] if resizes else start
        if final != full and timesteps:
            logger.warning("Gradual Latent: %d steps from timestep %d do not reach the full latent size %dx%d "
                           "(the schedule ends at %dx%d); the last step resizes to it", len(timesteps),
                           settings.timesteps, full[1], full[0], final[1], final[0])
            resizes[len(timesteps) - 1] = full
        return GrowLatents(settings, batch.scheduler, batch.timesteps, batch.generators, start, resizes)


class GrowLatents(Patch):
    """Starts the batch small and makes the resize steps' results at their new sizes."""

    def __init__(self, settings: GradualLatent, scheduler, timesteps, generators, start: tuple[int, int],
                 resizes: dict[int, tuple[int, int]]) -> None:
        self.settings, self.scheduler, self.generators = settings, scheduler, list(generators)
        self.timesteps = timesteps  # the loop's: step i runs timesteps[i]
        self.start_size, self.resizes = start, resizes

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        if tuple(latents.shape[-2:]) == self.start_size:
            return latents
        small = bicubic(latents, scale_factor=self.settings.ratio)
        return self.settings.unsharp(small) if self.settings.unsharp is not None else small

    def scheduler_step(self, ctx: StepContext, eps: torch.Tensor, latents: torch.Tensor, default) -> torch.Tensor:
        size = self.resizes.get(ctx.step)
        if size is None:
            return default(eps, latents)
        return self._resize_step(ctx, eps, latents, size)

    def _resize_step(self, ctx: StepContext, eps: torch.Tensor, latents: torch.Tensor,
                     size: tuple[int, int]) -> torch.Tensor:
        """One Euler ancestral step whose result is made at `size` (module docstring)."""
        s = self.scheduler
        # the scheduler's own step, its result dropped, moves it to the next step through its public API;
        # its noise comes from a throw-away generator, so the images' streams are untouched
        s.step(eps, self.timesteps[ctx.step], latents, generator=torch.Generator(eps.device).manual_seed(0))
        sigma, sigma_to = s.sigmas[s.step_index - 1], s.sigmas[s.step_index]
        x = latents.float()
        if s.config.prediction_type == "v_prediction":
            x0 = eps * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = x - sigma * eps
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        d, dt = (x - x0) / sigma, sigma_down - sigma
        unsharp = self.settings.unsharp or (lambda v: v)
        if self.settings.unsharp is not None and self.settings.unsharp.target_x:
            moved = unsharp(bicubic(x + d * dt, size=size))
        else:
            moved = unsharp(bicubic(x, size=size)) + bicubic(d, size=size) * dt
        shape = (latents.shape[0], latents.shape[1], *size)
        noise = randn_tensor(shape, dtype=eps.dtype, device=eps.device, generator=self.generators)
        return (moved + noise * sigma_up * self.settings.s_noise).to(eps.dtype)
