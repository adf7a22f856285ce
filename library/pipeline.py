"""The denoising loop for one batch of Jobs, and the VAE decode.

Classifier-free guidance runs conditional and unconditional inputs in one U-Net call. With
`negative_scale` (the manual's `--negative_scale` / `--nl`) the negative prompt gets its own
guidance term against the empty prompt:
    eps = eps_empty + scale * (eps_cond - eps_empty) - negative_scale * (eps_neg - eps_empty)
Otherwise the negative prompt is the unconditional input, as usual:
    eps = eps_neg + scale * (eps_cond - eps_neg)
eps vs v-prediction is the scheduler's business (its `prediction_type`), not the loop's.

img2img and inpainting (`library.img2img`) change only where the loop starts and what is
re-imposed after each step; ControlNet (`library.controlnet`) only adds residuals to U-Net
calls; the VAE memory options (`library.vae_memory`) only how the VAE runs.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from library import img2img
from library.controlnet import BatchControl, ControlNets
from library.img2img import Img2ImgInput
from library.jobs import Job
from library.progress import progress as tqdm
from library.results import check_latents
from library.samplers import make_scheduler, noises_per_step
from library.seeds import draw_image_noise
from library.text_encoding import PromptEncoder
from library.vae_memory import sliced_decode, sliced_encode_moments

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4


@dataclass
class Generator:
    """Makes latents and images for batches of Jobs with one loaded model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    encoder: PromptEncoder
    sampler: str
    v_prediction: bool
    device: torch.device
    dtype: torch.dtype
    noise_device: torch.device
    ddim_eta: float = 0.0
    progress: bool = True
    # Called once per denoising step with (step index, timestep); tests record calls here.
    step_callbacks: list[Callable[[int, int], None]] = field(default_factory=list)
    vae_slices: int | None = None  # `--vae_slices`: VAE in N horizontal bands (same result)
    controlnets: ControlNets | None = None  # used for jobs that have a guide image

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for every SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def latents(self, jobs: list[Job], init: Img2ImgInput | None = None) -> torch.Tensor:
        """Denoised latents (B, 4, H/8, W/8) for jobs that share a `batch_key`.

        With `init` (img2img / inpainting) only the schedule's tail that its strength
        selects is run, starting from the noised source.
        """
        first = jobs[0]
        scheduler = make_scheduler(self.sampler, self.v_prediction)
        scheduler.set_timesteps(first.steps, device=self.device)
        shape = (LATENT_CHANNELS, first.height // self.vae_scale, first.width // self.vae_scale)
        from_source = init is not None and not init.ignores_source
        noise = draw_image_noise(
            [j.seed for j in jobs],
            shape,
            steps=first.steps,
            noises_per_step=noises_per_step(self.sampler),
            img2img=from_source,
            device=self.noise_device,
            dtype=self.dtype,
        )
        timesteps = scheduler.timesteps
        keep = None
        if from_source:
            source = init.source_latents = self._source_latents(init, noise.generators)
            begin = img2img.first_step(first.steps, init.strength) * scheduler.order
            timesteps = timesteps[begin:]
            img2img.set_begin_index(scheduler, begin)
            latents = img2img.starting_latents(scheduler, source, noise, timesteps, init.strength)
            if init.masks is not None:
                keep = img2img.KeepUnmasked(source, noise.img2img, init.masks)
                latents = keep.before(scheduler, latents, timesteps)
        else:
            latents = noise.initial.to(self.device) * scheduler.init_noise_sigma
        return self._denoise(jobs, scheduler, timesteps, latents, noise.generators, keep)

    def _denoise(self, jobs: list[Job], scheduler, timesteps: torch.Tensor, latents: torch.Tensor,
                 generators: list[torch.Generator], keep: img2img.KeepUnmasked | None) -> torch.Tensor:
        """The loop over `timesteps`: guidance, scheduler step, mask re-imposition."""
        if len(timesteps) == 0:
            return latents
        embeddings, guidance = self._conditioning(jobs)
        step_kwargs = self._step_kwargs(scheduler, generators)
        control = self._control(jobs, guidance.copies)
        for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not self.progress)):
            for callback in self.step_callbacks:
                callback(i, int(t))
            model_input = scheduler.scale_model_input(torch.cat([latents] * guidance.copies), t)
            extra = control.unet_kwargs(i, len(timesteps), model_input, t, embeddings) if control else {}
            out = self.unet(model_input, t, encoder_hidden_states=embeddings, **extra).sample
            latents = scheduler.step(guidance.combine(out), t, latents, **step_kwargs).prev_sample
            check_latents(latents, i, len(timesteps))  # NaN/inf: stop, never save a black image
            if keep is not None:
                latents = keep.after(scheduler, latents, timesteps, i)
        return latents

    def _control(self, jobs: list[Job], copies: int) -> BatchControl | None:
        """The batch's ControlNet guidance, when the run has ControlNets and the jobs guide images."""
        if self.controlnets is None or jobs[0].guide_image is None:
            return None
        first = jobs[0]
        return self.controlnets.for_batch([j.guide_image for j in jobs], first.width, first.height, copies,
                                          self.device, self.dtype)

    def _source_latents(self, init: Img2ImgInput, generators: list[torch.Generator]) -> torch.Tensor:
        """The source in latent space: given latents, or the images encoded (draw 4)."""
        if init.latents is not None:
            return init.latents.to(self.device, self.dtype)
        latents = self.encode_images(init.images, generators, init.vae_batch_size)
        return latents.to(self.device, self.dtype)

    def _conditioning(self, jobs: list[Job]) -> tuple[torch.Tensor, "Guidance"]:
        first = jobs[0]
        prompts = [j.prompt for j in jobs]
        negatives = [j.negative_prompt for j in jobs]
        encode = lambda texts: self.encoder.encode(texts, first.chunks).to(self.device, self.dtype)  # noqa: E731
        if first.scale <= 1.0 and not first.negative_scale:
            return encode(prompts), Guidance(1, first.scale, None)
        if first.negative_scale:
            parts = [encode([""] * len(jobs)), encode(prompts), encode(negatives)]
            return torch.cat(parts), Guidance(3, first.scale, first.negative_scale)
        return torch.cat([encode(negatives), encode(prompts)]), Guidance(2, first.scale, None)

    def _step_kwargs(self, scheduler, generators: list[torch.Generator]) -> dict:
        accepted = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, object] = {}
        if "generator" in accepted:
            kwargs["generator"] = generators
        if "eta" in accepted:
            kwargs["eta"] = self.ddim_eta
        return kwargs

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator],
                      vae_batch_size: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents; each posterior sample is drawn from its
        image's own generator (`latent_dist.sample(generator=...)`), so it is batch-invariant."""
        size = max(1, vae_batch_size or images.shape[0])
        parts = []
        for start in range(0, images.shape[0], size):
            moments = self._half_vae_guard(self._encode_moments, images[start : start + size])
            for offset in range(moments.shape[0]):
                posterior = DiagonalGaussianDistribution(moments[offset : offset + 1])
                parts.append(posterior.sample(generator=generators[start + offset]).float())
        return torch.cat(parts) * self.vae.config.scaling_factor

    def _encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.vae.dtype)
        if self.vae_slices and self.vae_slices > 1:
            return sliced_encode_moments(self.vae, images, self.vae_slices)
        return self.vae.encode(images).latent_dist.parameters

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, vae_batch_size: int) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W), decoded `vae_batch_size` at a time (fp32 on NaN)."""
        scaled = latents / self.vae.config.scaling_factor
        parts = []
        for start in range(0, scaled.shape[0], max(1, vae_batch_size)):
            chunk = scaled[start : start + max(1, vae_batch_size)]
            parts.append(self._half_vae_guard(self._decode_chunk, chunk).float().cpu())
        return torch.cat(parts)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.vae.dtype)
        if self.vae_slices and self.vae_slices > 1:
            return sliced_decode(self.vae, latents, self.vae_slices)
        return self.vae.decode(latents).sample

    def _half_vae_guard(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`run(x)`; if a half-precision VAE made NaN/inf, switch the VAE to fp32 and rerun."""
        out = run(x)
        if self.vae.dtype != torch.float32 and not torch.isfinite(out).all():
            logger.warning("the half-precision VAE produced NaN; switching the VAE to fp32 (--no_half_vae)")
            self.vae.to(torch.float32)
            out = run(x)
        return out


@dataclass(frozen=True)
class Guidance:
    """How the U-Net outputs of one step combine: 1 (no CFG), 2 (CFG) or 3 (negative scale)."""

    copies: int
    scale: float
    negative_scale: float | None

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            return out
        if self.copies == 2:
            uncond, cond = out.chunk(2)
            return uncond + self.scale * (cond - uncond)
        empty, cond, negative = out.chunk(3)
        return empty + self.scale * (cond - empty) - self.negative_scale * (negative - empty)
