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

import torch
from diffusers.utils.torch_utils import randn_tensor

from library.features.deep_shrink import bicubic
from library.errors import UserError
from library.records.gradual_latent_settings import SAMPLERS, GradualLatent
from library.sampling.patches import Batch, Patch, StepContext

logger = logging.getLogger(__name__)


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
