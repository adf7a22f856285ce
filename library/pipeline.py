"""The denoising loop for one batch of Jobs, and the VAE decode.

Classifier-free guidance runs conditional and unconditional inputs in one U-Net call. With
`negative_scale` (the manual's `--negative_scale` / `--nl`) the negative prompt gets its own
guidance term against the empty prompt:
    eps = eps_empty + scale * (eps_cond - eps_empty) - negative_scale * (eps_neg - eps_empty)
Otherwise the negative prompt is the unconditional input, as usual:
    eps = eps_neg + scale * (eps_cond - eps_neg)
eps vs v-prediction is the scheduler's business (its `prediction_type`), not the loop's.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from library.jobs import Job
from library.samplers import make_scheduler, noises_per_step
from library.seeds import draw_image_noise
from library.text_encoding import PromptEncoder

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

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for every SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def latents(self, jobs: list[Job]) -> torch.Tensor:
        """Denoised latents (B, 4, H/8, W/8) for jobs that share a `batch_key`."""
        first = jobs[0]
        scheduler = make_scheduler(self.sampler, self.v_prediction)
        scheduler.set_timesteps(first.steps, device=self.device)
        shape = (LATENT_CHANNELS, first.height // self.vae_scale, first.width // self.vae_scale)
        noise = draw_image_noise(
            [j.seed for j in jobs],
            shape,
            steps=first.steps,
            noises_per_step=noises_per_step(self.sampler),
            img2img=False,
            device=self.noise_device,
            dtype=self.dtype,
        )
        latents = noise.initial.to(self.device) * scheduler.init_noise_sigma
        embeddings, guidance = self._conditioning(jobs)
        step_kwargs = self._step_kwargs(scheduler, noise.generators)
        timesteps = scheduler.timesteps
        for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not self.progress)):
            for callback in self.step_callbacks:
                callback(i, int(t))
            model_input = scheduler.scale_model_input(torch.cat([latents] * guidance.copies), t)
            out = self.unet(model_input, t, encoder_hidden_states=embeddings).sample
            latents = scheduler.step(guidance.combine(out), t, latents, **step_kwargs).prev_sample
        return latents

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
    def decode(self, latents: torch.Tensor, vae_batch_size: int) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W), decoded `vae_batch_size` at a time (fp32 on NaN)."""
        scaled = latents / self.vae.config.scaling_factor
        parts = []
        for start in range(0, scaled.shape[0], max(1, vae_batch_size)):
            chunk = scaled[start : start + vae_batch_size]
            image = self.vae.decode(chunk.to(self.vae.dtype)).sample
            if self.vae.dtype != torch.float32 and not torch.isfinite(image).all():
                logger.warning("the half-precision VAE produced NaN; switching the VAE to fp32 (--no_half_vae)")
                self.vae.to(torch.float32)
                image = self.vae.decode(chunk.to(torch.float32)).sample
            parts.append(image.float().cpu())
        return torch.cat(parts)


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
