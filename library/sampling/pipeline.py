"""The denoising loop for one batch of Jobs, and the VAE decode.

Classifier-free guidance runs conditional and unconditional inputs in one U-Net call. With
`negative_scale` (the manual's `--negative_scale` / `--nl`) the negative prompt gets its own
guidance term against the empty prompt:
    eps = eps_empty + scale * (eps_cond - eps_empty) - negative_scale * (eps_neg - eps_empty)
Otherwise the negative prompt is the unconditional input, as usual:
    eps = eps_neg + scale * (eps_cond - eps_neg)
eps vs v-prediction is the scheduler's business (its `prediction_type`), not the loop's.

img2img (`library.sampling.img2img`) changes only where the loop starts. Everything else that changes
a step (LoRA, XTI, ControlNet, inpainting, ...) is a feature of the patch owner
(`library.sampling.patches`), given to the Pipeline by the run (`library.run.build.pipeline`) and
installed for the batch around the loop; the loop names none of them.
The VAE memory options (`library.sampling.vae_slices`) only change how the VAE runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from library.heap import mapped_blocks_from, release_freed_memory
from library.images.metadata import FeatureMetadata
from library.progress import progress as tqdm
from library.records.jobs import Job
from library.records.samplers import noises_per_step
from library.sampling import img2img
from library.sampling.added_conditioning import with_time_ids
from library.sampling.checks import check_latents
from library.sampling.img2img import Img2ImgInput
from library.sampling.noise import draw_image_noise
from library.sampling.patches import Batch, BatchLayout, Feature, PatchOwner, SourceLatents
from library.sampling.prompt_schedule import step_conditionings
from library.sampling.schedulers import make_scheduler
from library.sampling.vae_slices import sliced_decode, sliced_encode_moments
from library.text.encoder import Conditioning, PromptEncoder
from library.text.sdxl_encoder import DualPromptEncoder

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4


@dataclass
class Pipeline:
    """Makes latents and images for batches of Jobs with one loaded model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    encoder: PromptEncoder | DualPromptEncoder  # SDXL: both text encoders (`library.text.sdxl_encoder`)
    sampler: str
    v_prediction: bool
    device: torch.device
    dtype: torch.dtype
    noise_device: torch.device
    ddim_eta: float = 0.0
    progress: bool = True
    vae_slices: int | None = None  # `--vae_slices`: VAE in N horizontal bands (same result)
    zero_steps_offset: bool = False  # `--force_scheduler_zero_steps_offset` (img2img start only)
    zero_terminal_snr: bool = False  # `--zero_terminal_snr`: the scheduler's betas rescaled
    start_noise: Callable | None = None  # `library.sampling.start_noise.StartNoise` (noise offset / pyramid noise)
    eta_noise_seed_delta: int = 0  # `--eta_noise_seed_delta` (ENSD): re-seeds each stream after its first draw
    # what the patch owner installs per batch, in order (`library.features.FEATURES` in a run)
    features: list[Feature] = field(default_factory=list)

    def __post_init__(self) -> None:
        mirrors = [model for feature in self.features for model in feature.mirrors()]
        self.patches = PatchOwner(self.unet, self.features, mirrors)

    def check_job(self, job: Job) -> None:
        """Raise `UserError` for a Job a feature cannot make (its prompt line is then skipped)."""
        for feature in self.patches.features:
            feature.check_job(job)

    def metadata(self, job: Job) -> FeatureMetadata:
        """What the features write into `job`'s image, joined in the features' order."""
        return sum((feature.metadata(job) for feature in self.patches.features), FeatureMetadata())

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
        sampler = first.sampler or self.sampler  # a prompt line's `--sa`, else the run's
        scheduler = make_scheduler(sampler, self.v_prediction, zero_terminal_snr=self.zero_terminal_snr)
        scheduler.set_timesteps(first.steps, device=self.device)
        shape = (LATENT_CHANNELS, first.height // self.vae_scale, first.width // self.vae_scale)
        from_source = init is not None and not init.ignores_source
        noise = draw_image_noise(
            [j.seed for j in jobs],
            shape,
            steps=first.steps,
            noises_per_step=noises_per_step(sampler),
            img2img=from_source,
            device=self.noise_device,
            dtype=self.dtype,
            modify=self.start_noise,
            variations=[j.variation for j in jobs],
            eta_noise_seed_delta=self.eta_noise_seed_delta,
        )
        timesteps, source = scheduler.timesteps, None
        if from_source:
            latents = init.source_latents = self._source_latents(init, noise.generators)
            start = img2img.start_indices(first.steps, init.strength, self._steps_offset(scheduler), scheduler.order)
            timesteps = timesteps[start.begin:]
            source = SourceLatents(latents, noise.img2img.to(latents), init.masks)
            latents = img2img.starting_latents(scheduler, latents, noise, start, init.strength)
        else:
            latents = noise.initial.to(self.device) * scheduler.init_noise_sigma
        cfg = CFG.of(first)
        layout = BatchLayout(len(jobs), cfg.copies, shape[1], shape[2])
        batch = Batch(tuple(jobs), layout, scheduler, timesteps, self.device, self.dtype, source,
                      tuple(noise.generators))
        return self._denoise(batch, cfg, latents, self._step_kwargs(scheduler, noise.generators))

    def _steps_offset(self, scheduler) -> int:
        """The offset of the original's img2img start rule: the scheduler's `steps_offset`,
        or 0 with `--force_scheduler_zero_steps_offset` (the scheduler itself keeps its own)."""
        if self.zero_steps_offset:
            return 0
        return int(scheduler.config.get("steps_offset", 0) or 0)

    def _denoise(self, batch: Batch, cfg: CFG, latents: torch.Tensor, step_kwargs: dict) -> torch.Tensor:
        """The loop over the batch's timesteps, with the batch's patches installed."""
        scheduler = batch.scheduler
        with self.patches.installed(batch) as run:
            latents = run.start(latents)
            if len(batch.timesteps) == 0:
                return latents
            conds = step_conditionings(batch.jobs, len(batch.timesteps), len(scheduler.timesteps),
                                       lambda jobs: self._conditioning(jobs, cfg, run), self.encoder.chunk_count)
            desc = run.description("steps")
            for i, t in enumerate(tqdm(batch.timesteps, desc=desc, leave=False, disable=not self.progress)):
                ctx = run.context(i, t)
                scale = lambda x, t=t: scheduler.scale_model_input(x, t)  # noqa: E731
                model_input = run.scale_model_input(ctx, torch.cat([latents] * cfg.copies), scale)
                eps = run.after_cfg(ctx, latents, cfg.combine(run.unet_call(ctx, model_input, t, conds[i])))
                latents, eps = run.guide(ctx, latents, eps, t)
                step = lambda e, x, t=t: scheduler.step(e, t, x, **step_kwargs).prev_sample  # noqa: E731
                latents = run.after_step(ctx, run.scheduler_step(ctx, eps, latents, step))
                check_latents(latents, i, len(batch.timesteps))  # NaN/inf: stop, never save a black image
        return latents

    def _source_latents(self, init: Img2ImgInput, generators: list[torch.Generator]) -> torch.Tensor:
        """The source in latent space: given latents, or the images encoded (draw 4)."""
        if init.latents is not None:
            return init.latents.to(self.device, self.dtype)
        latents = self.encode_images(init.images, generators, init.vae_batch_size)
        return latents.to(self.device, self.dtype)

    def _conditioning(self, jobs: tuple[Job, ...], cfg: CFG, run=None) -> Conditioning:
        """Text states of the batch's rows, in the order `cfg` combines them.

        A prompt split at ` AND ` is encoded part by part (`Conditioning.parts`, part 0 in
        the prompt rows of `states`; on SDXL the last part's pooled vector, as the original);
        `run.text_encoding` tells the patches what is encoded. SDXL rows also get their size
        numbers (`library.sampling.added_conditioning`).
        """
        first = jobs[0]
        prompts = [j.prompt for j in jobs]

        def encode(texts: list[str], role: str = "prompt", part: int = 0) -> Conditioning:
            if run is not None:
                run.text_encoding(role, part)
            return self.encoder.conditioning(texts, first.chunks).to(self.device, self.dtype)

        parts = tuple(encode([j.prompt_parts[k] for j in jobs], "prompt", k) for k in range(len(first.prompt_parts)))
        prompt = parts[0] if parts else encode(prompts)
        if parts and parts[-1].pooled is not None:
            prompt = replace(prompt, pooled=parts[-1].pooled)
        if cfg.copies == 1:
            rows = prompt
        else:
            negatives = encode([j.negative_prompt for j in jobs], "negative")
            if cfg.copies == 3:
                rows = Conditioning.cat([encode([""] * len(jobs), "empty"), prompt, negatives])
            else:
                rows = Conditioning.cat([negatives, prompt])
        return replace(with_time_ids(rows, jobs, cfg.copies), parts=parts)

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
        release_freed_memory()  # the U-Net loop's freed activations leave before the decoder's come
        scaled = latents / self.vae.config.scaling_factor
        parts = []
        with mapped_blocks_from(4 << 20):
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
class CFG:
    """Classifier-free guidance: how the U-Net outputs of one step combine, from `copies` rows per
    image: 1 (no CFG), 2 (CFG) or 3 (with a negative scale)."""

    copies: int
    scale: float
    negative_scale: float | None

    @classmethod
    def of(cls, job: Job) -> CFG:
        """No CFG at scale <= 1 without a negative scale; CFG; or CFG with a negative scale."""
        if job.scale <= 1.0 and not job.negative_scale:
            return cls(1, job.scale, None)
        if job.negative_scale:
            return cls(3, job.scale, job.negative_scale)
        return cls(2, job.scale, None)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            return out
        if self.copies == 2:
            uncond, cond = out.chunk(2)
            return uncond + self.scale * (cond - uncond)
        empty, cond, negative = out.chunk(3)
        return empty + self.scale * (cond - empty) - self.negative_scale * (negative - empty)
