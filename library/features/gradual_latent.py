"""Gradual Latent: denoise small first, enlarge the latent step by step to the size asked for.

Written by hand (no library has it), with the original's semantics (`docs/deep_shrink.md`),
for `euler_a` / `k_euler_a` (with another sampler, as in the original, images are made without it:
`--gradual_latent_timesteps` is dropped with a warning by `library.cli.compat`, and a prompt
line's `--glt ...` gives one warning per run and is ignored; the line is not skipped):

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
  each image's own stream, in order. Other steps are the plain Euler ancestral step (no s_noise),
  bit for bit the scheduler's.
* The patch makes every step of its batch itself (`library.sampling.step_math`), keeping its own
  step index into the scheduler's public ``sigmas`` (from its begin index), and so also scales the
  U-Net's input: a diffusers scheduler scales by an internal position that only its own ``step``
  advances, which never runs here.
* Beyond the original (which can end smaller than asked, e.g. 480 px ends at 448): when the
  schedule does not reach the full size, one warning says so and the last step resizes to it.
* Inpainting masks follow the latent size; Highres fix applies it to both stages.
"""

from __future__ import annotations

import logging

import torch
from diffusers.utils.torch_utils import randn_tensor

from library.features.deep_shrink import bicubic
from library.records.gradual_latent_settings import SAMPLERS, GradualLatent
from library.sampling.patches import Batch, FeatureBase, Patch, RunSetup, StepContext
from library.sampling.step_math import denoised, euler_ancestral_step, scale_input, sigma_at

logger = logging.getLogger(__name__)


class GradualLatentFeature(FeatureBase):
    """The patch owner's feature: batches whose Jobs have Gradual Latent settings get `GrowLatents`."""

    def __init__(self, sampler: str, vae_scale: int = 8) -> None:
        self.sampler = sampler
        self.vae_scale = vae_scale
        self._warned = False

    @classmethod
    def from_run(cls, setup: RunSetup) -> GradualLatentFeature:
        """Every run has it (any prompt line may set Gradual Latent); it checks the run's sampler."""
        vae_levels = len(getattr(setup.model.vae.config, "block_out_channels", ())) or 4
        return cls(setup.options.generation.sampler, 2 ** (vae_levels - 1))

    def usable(self, job) -> bool:
        """Whether the job's sampler (a prompt line's `--sa`, else the run's) can grow the latent."""
        return (job.sampler or self.sampler) in SAMPLERS

    def check_job(self, job) -> None:
        """A Job with Gradual Latent under another sampler: made without it, one warning per run;
        under euler_a a start size of 0 pixels or an unsharp kernel larger than the start latent
        is the user's mistake (the line is skipped)."""
        if job.gradual_latent is not None and self.usable(job):
            job.gradual_latent.check_size(job.width, job.height, self.vae_scale)
        if job.gradual_latent is None or self.usable(job) or self._warned:
            return
        self._warned = True
        logger.warning("Gradual Latent (--glt and the other --gl options of prompt lines) works with --sampler "
                       "euler_a or k_euler_a, not %s; those images are made without it (as the original)",
                       job.sampler or self.sampler)

    def for_batch(self, batch: Batch) -> GrowLatents | None:
        settings = batch.jobs[0].gradual_latent
        if settings is None or not self.usable(batch.jobs[0]):
            return None
        layout = batch.layout
        timesteps = [int(t) for t in batch.timesteps]
        start, resizes = settings.sizes(timesteps, layout.latent_height, layout.latent_width)
        settings.check_size(layout.latent_width * self.vae_scale, layout.latent_height * self.vae_scale, self.vae_scale)
        full = (layout.latent_height, layout.latent_width)
        final = resizes[max(resizes)] if resizes else start
        if final != full and timesteps:
            logger.warning("Gradual Latent: %d steps from timestep %d do not reach the full latent size %dx%d "
                           "(the schedule ends at %dx%d); the last step resizes to it", len(timesteps),
                           settings.timesteps, full[1], full[0], final[1], final[0])
            resizes[len(timesteps) - 1] = full
        return GrowLatents(settings, batch.scheduler, batch.timesteps, batch.generators, start, resizes)


class GrowLatents(Patch):
    """Starts the batch small and makes every step, the resize steps' results at their new sizes."""

    def __init__(self, settings: GradualLatent, scheduler, timesteps, generators, start: tuple[int, int],
                 resizes: dict[int, tuple[int, int]]) -> None:
        self.settings, self.generators = settings, list(generators)
        self.timesteps = timesteps  # the loop's: step i runs timesteps[i]
        self.start_size, self.resizes = start, resizes
        # the scheduler's public schedule; step i of the loop runs from sigmas[begin + i] to the next
        self.sigmas, self.begin = scheduler.sigmas, scheduler.begin_index
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        if tuple(latents.shape[-2:]) == self.start_size:
            return latents
        small = bicubic(latents, scale_factor=self.settings.ratio)
        return self.settings.unsharp(small) if self.settings.unsharp is not None else small

    def scale_model_input(self, ctx: StepContext, sample: torch.Tensor, default) -> torch.Tensor:
        return scale_input(sample, sigma_at(self.sigmas, ctx.step, self.begin))

    def scheduler_step(self, ctx: StepContext, eps: torch.Tensor, latents: torch.Tensor, default) -> torch.Tensor:
        """Step `ctx.step` of Euler ancestral (module docstring); `default` is never called."""
        sigma = sigma_at(self.sigmas, ctx.step, self.begin)
        sigma_next = sigma_at(self.sigmas, ctx.step + 1, self.begin)
        x = latents.float()
        x0 = denoised(x, eps, sigma, self.v_prediction)
        size = self.resizes.get(ctx.step)
        if size is None:
            noise = randn_tensor(eps.shape, dtype=eps.dtype, device=eps.device, generator=self.generators)
            return euler_ancestral_step(x, x0, sigma, sigma_next, noise).to(eps.dtype)
        unsharp = self.settings.unsharp
        shape = (latents.shape[0], latents.shape[1], *size)
        noise = randn_tensor(shape, dtype=eps.dtype, device=eps.device, generator=self.generators)
        moved = euler_ancestral_step(x, x0, sigma, sigma_next, noise, s_noise=self.settings.s_noise,
                                     resize=lambda v: bicubic(v, size=size), sharpen=unsharp,
                                     resize_after_step=unsharp is not None and unsharp.target_x)
        return moved.to(eps.dtype)
