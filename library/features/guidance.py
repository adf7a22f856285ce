"""CLIP text, CLIP image and VGG16 guidance: steer each step towards a text's or an image's features.

Options (the manual's names, the original's defaults): `--clip_guidance_scale` (0 = off),
`--clip_image_guidance_scale`, `--vgg16_guidance_scale`, `--vgg16_guidance_layer` (20),
`--guide_image_path` (shared with ControlNet: image n of the run gets guide n mod count), the
prompt option `--c TEXT` (the text CLIP guidance uses for that image instead of the prompt),
and the local models `--clip_model` / `--vgg16_weights` (`library.models.clip_guidance`,
`library.models.vgg16`).

Per step, after CFG combines the noise prediction and before the scheduler step (the patch
owner's ``guide`` point), each enabled guidance runs in the order text, image, VGG, one image
at a time, with gradients on:

1. a second U-Net pass on the current latent x with that image's conditional text only (no
   CFG), through the owner's `unet(sample, rows)`, so LoRA, ControlNet, XTI apply as in the loop;
2. an x0 estimate and the sample to decode, s. Samplers whose latents live at unit variance
   (DDIM, PNDM, DPM-Solver, UniPC, LCM): ``x0 = (x - sqrt(1-a)*eps) / sqrt(a)`` with
   ``a = alphas_cumprod[t]``, ``f = sqrt(1-a)``, ``s = f*x0 + (1-f)*x``. Samplers on the sigma
   scale (LMS, Euler, Euler a, Heun, DPM2, DPM2 a): input ``x / sqrt(sigma^2+1)``,
   ``s = x0 = x - sigma*eps``. v-prediction models convert v to eps / x0 first;
3. ``img = clamp(VAE.decode(s / scaling) / 2 + 0.5, 0, 1)``, with gradient checkpointing in
   the decoder (same result, less memory): the patch's ``install`` turns it on for the batch
   through diffusers' public switch, and the end of the batch turns it off again unless the VAE
   had it on before;
4. CLIP: bilinear antialiased resize to 224x224, CLIP normalisation, image features,
   L2-normalised; ``loss = scale * mean(2*arcsin(|a-b|/2)^2)`` against the text's (or guide
   image's, resized NEAREST to 224x224) normalised features. VGG: resize to (H/4, W/4),
   ImageNet normalisation, `features[:layer+1]`; ``loss = scale * mean((F - F_guide)^2)``
   against the guide resized NEAREST to (W/4, H/4);
5. ``g = -d loss / d x``; unit-variance samplers: ``eps := eps - sqrt(1-a)*g`` (for
   v-prediction the same change, expressed in v: divided by sqrt(a)); sigma samplers:
   ``x := x + sigma^2 * g``. The original's DDIM / PNDM / LMS formulas are these, unchanged.

The text for CLIP is the prompt without weight syntax (each weighted piece tokenised on its
own, BREAK dropped), cut to 77 tokens (the first 76 and the end token). Image and VGG guidance
need `--guide_image_path` (checked up front; the original's fallback to the previous batch's
first output is not offered). Images without a guide (a Highres fix 2nd stage with
`--highres_fix_disable_control_net`) get text guidance only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from library.images import input_images as image_io
from library.images.metadata import FeatureMetadata
from library.records.jobs import Job
from library.sampling.patches import Batch, BatchLayout, BatchRun, FeatureBase, Patch, RowsUNet, RunSetup, StepContext
from library.sampling.step_math import alpha_bar_at, denoised, denoised_alpha_bar, scale_input
from library.text.weighting import BREAK_TEXT, parse_prompt_attention

logger = logging.getLogger(__name__)

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_DIVISOR = 4
TOKENS = 77


@dataclass(frozen=True)
class Scales:
    """The three guidance scales (0 = off) and the VGG16 layer."""

    clip_text: float = 0.0
    clip_image: float = 0.0
    vgg16: float = 0.0
    vgg16_layer: int = 20

    @property
    def enabled(self) -> bool:
        return bool(self.clip_text or self.clip_image or self.vgg16)


def spherical_loss(a: Tensor, b: Tensor) -> Tensor:
    """``2 * arcsin(|a - b| / 2)^2`` per row, for L2-normalised rows."""
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _pil_tensor(picture: Image.Image, size: tuple[int, int]) -> Tensor:
    """An RGB picture resized NEAREST to `size` (width, height) as (1, 3, H, W) in [0, 1]."""
    pixels = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def _wide(x: Tensor) -> Tensor:
    """`x` in float32, or float64 if it is (half-precision models compute their losses in fp32)."""
    return x if x.dtype == torch.float64 else x.float()


def _pooled(output) -> Tensor:
    """transformers 5 returns an output object from `get_*_features`; older versions a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipGuide:
    """The CLIP model of text and image guidance, with the SD tokenizer for its text."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.vocab = model.config.text_config.vocab_size
        self._cache: dict[tuple, Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, text: str, weighted: bool) -> list[int]:
        """77 ids: BOS, the text (weight syntax removed when `weighted`), EOS, padding; longer
        texts keep their first 76 ids and the end token."""
        tok = self.tokenizer
        pieces = [t for t, w in parse_prompt_attention(text) if not (t == BREAK_TEXT and w == -1)] if weighted \
            else [text]
        ids = [i for piece in pieces for i in tok(piece, add_special_tokens=False).input_ids]
        dropped = [i for i in ids if i >= self.vocab]
        if dropped:
            logger.warning("CLIP guidance: %d token(s) of embeddings the CLIP model does not know are left out",
                           len(dropped))
        ids = [tok.bos_token_id, *(i for i in ids if i < self.vocab), tok.eos_token_id]
        if len(ids) > TOKENS:
            ids = ids[: TOKENS - 1] + [ids[-1]]
        return ids + [tok.pad_token_id] * (TOKENS - len(ids))

    def text_features(self, job: Job) -> Tensor:
        """The normalised features of the image's CLIP text: `--c`, else its prompt."""
        text, weighted = (job.clip_prompt, False) if job.clip_prompt is not None else (job.prompt, True)
        key = ("text", text, weighted)
        if key not in self._cache:
            ids = torch.tensor([self.token_ids(text, weighted)], device=self.device)
            with torch.no_grad():
                features = _wide(_pooled(self.model.get_text_features(input_ids=ids)))
            self._cache[key] = features / features.norm(dim=-1, keepdim=True)
        return self._cache[key]

    def guide_features(self, path: str) -> Tensor:
        """The normalised features of a guide image, resized NEAREST to 224x224."""
        key = ("image", path)
        if key not in self._cache:
            pixels = _pil_tensor(image_io.load_rgb(Path(path)), (CLIP_SIZE, CLIP_SIZE)).to(self.device)
            with torch.no_grad():
                features = self.image_features(pixels)
            self._cache[key] = features.detach()
        return self._cache[key]

    def image_features(self, image: Tensor) -> Tensor:
        """Normalised features of (1, 3, H, W) images in [0, 1] (differentiable)."""
        x = F.interpolate(_wide(image), size=(CLIP_SIZE, CLIP_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = _normalise(x, CLIP_MEAN, CLIP_STD).to(self.dtype)
        features = _wide(_pooled(self.model.get_image_features(pixel_values=x)))
        return features / features.norm(dim=-1, keepdim=True)

    def loss(self, image: Tensor, target: Tensor, scale: float) -> Tensor:
        return scale * spherical_loss(self.image_features(image), target).mean()


class VggGuide:
    """VGG16's features up to one layer, for VGG16 guidance."""

    def __init__(self, features: torch.nn.Sequential, layer: int) -> None:
        self.features = features[: layer + 1]
        self._cache: dict[tuple, Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.features.parameters()).dtype

    def _run(self, x: Tensor) -> Tensor:
        device = next(self.features.parameters()).device
        return _wide(self.features(_normalise(_wide(x), IMAGENET_MEAN, IMAGENET_STD).to(device, self.dtype)))

    def guide_features(self, path: str, width: int, height: int) -> Tensor:
        key = (path, width, height)
        if key not in self._cache:
            pixels = _pil_tensor(image_io.load_rgb(Path(path)), (width // VGG_DIVISOR, height // VGG_DIVISOR))
            with torch.no_grad():
                self._cache[key] = self._run(pixels)
        return self._cache[key]

    def loss(self, image: Tensor, target: Tensor, scale: float) -> Tensor:
        size = (image.shape[-2] // VGG_DIVISOR, image.shape[-1] // VGG_DIVISOR)
        x = F.interpolate(_wide(image), size=size, mode="bilinear", align_corners=False, antialias=True)
        return scale * (self._run(x) - target.to(x.device)).pow(2).mean()


class GuidedGeneration(FeatureBase):
    """The guidance feature: every batch gets a `GuidedBatch` while some scale is not 0."""

    def __init__(self, vae: torch.nn.Module, scales: Scales, clip: ClipGuide | None = None,
                 vgg: VggGuide | None = None, v_prediction: bool = False, checkpoint_decoder: bool = True) -> None:
        """`checkpoint_decoder`: recompute the decoder's activations in the backward pass (less memory)."""
        if (scales.clip_text or scales.clip_image) and clip is None:
            raise ValueError("CLIP guidance needs a CLIP model")
        if scales.vgg16 and vgg is None:
            raise ValueError("VGG16 guidance needs VGG16 features")
        self.vae, self.scales, self.clip, self.vgg, self.v_prediction = vae, scales, clip, vgg, v_prediction
        self.checkpoint_decoder = checkpoint_decoder

    @classmethod
    def from_run(cls, setup: RunSetup) -> GuidedGeneration | None:
        """CLIP text / image and VGG16 guidance with their local models, or None when every scale is 0."""
        options, model = setup.options.guidance, setup.model
        scales = Scales(options.clip_scale, options.clip_image_scale, options.vgg16_scale, options.vgg16_layer)
        if not scales.enabled:
            return None
        clip = vgg = None
        if scales.clip_text or scales.clip_image:
            from library.models.clip_guidance import load_clip_model

            asked = "--clip_guidance_scale" if scales.clip_text else "--clip_image_guidance_scale"
            clip = ClipGuide(load_clip_model(options.clip_model, setup.device, setup.dtype, asked), model.tokenizer)
        if scales.vgg16:
            from library.models.vgg16 import load_vgg16_features

            vgg = VggGuide(load_vgg16_features(options.vgg16_weights, setup.device, setup.dtype), scales.vgg16_layer)
        logger.info("guidance: CLIP text %g, CLIP image %g, VGG16 %g (layer %d)", scales.clip_text,
                    scales.clip_image, scales.vgg16, scales.vgg16_layer)
        return cls(model.vae, scales, clip, vgg, model.kind.v_prediction)

    def metadata(self, job: Job) -> FeatureMetadata:
        """The guidance of every image, as A1111-style parameters (the scales that are on)."""
        s = self.scales
        items = [("CLIP guidance scale", s.clip_text), ("CLIP image guidance scale", s.clip_image),
                 ("VGG16 guidance scale", s.vgg16)]
        layer = (("VGG16 guidance layer", s.vgg16_layer),) if s.vgg16 else ()
        return FeatureMetadata(parameters=(*((key, value) for key, value in items if value), *layer))

    def for_batch(self, batch: Batch) -> GuidedBatch | None:
        if not self.scales.enabled:
            return None
        terms: list[list[tuple]] = []  # per image: (name, target, scale)
        s = self.scales
        for job in batch.jobs:
            mine: list[tuple] = []
            if s.clip_text:
                mine.append(("CLIP", self.clip.text_features(job), s.clip_text))
            if job.guide_image is not None:
                if s.clip_image:
                    mine.append(("CLIP image", self.clip.guide_features(job.guide_image), s.clip_image))
                if s.vgg16:
                    mine.append(("VGG16", self.vgg.guide_features(job.guide_image, job.width, job.height), s.vgg16))
            terms.append(mine)
        if not any(terms):
            return None
        return GuidedBatch(self, batch, terms)


def sigma_scaled(scheduler) -> bool:
    """Whether the scheduler's latents are on the sigma scale (x = x0 + sigma*eps: LMS, Euler, ...)
    rather than at unit variance (DDIM, PNDM, DPM-Solver, ...)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 + 1e-6


class GuidedBatch(Patch):
    """The guidance of one batch: per step and image, the loss gradient changes eps or x."""

    def __init__(self, feature: GuidedGeneration, batch: Batch, terms: list[list[tuple]]) -> None:
        self.feature, self.batch, self.terms = feature, batch, terms
        self.sigma_space = sigma_scaled(batch.scheduler)
        names = dict.fromkeys(name for mine in terms for name, _, _ in mine)
        self.progress_label = " + ".join(names) + " guidance"  # e.g. "CLIP + VGG16 guidance"

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        """Gradient checkpointing in the VAE for the batch (its decoder's backward pass recomputes
        activations instead of keeping them); `stack` restores the VAE's own setting."""
        vae = self.feature.vae
        if self.feature.checkpoint_decoder and getattr(vae, "decoder", None) is not None:
            checkpoint_gradients(stack, vae)

    def cond_row(self, layout: BatchLayout, image: int) -> int:
        """The layout row of image `image`'s conditional text ([uncond, cond] / [empty, cond, neg])."""
        return image if layout.copies == 1 else layout.images + image

    def guide(self, ctx: StepContext, latents: Tensor, eps: Tensor, unet: RowsUNet) -> tuple[Tensor, Tensor]:
        """Each image's terms in turn (text, image, VGG16), each seeing the previous one's (x, eps)."""
        timestep = self.batch.timesteps[ctx.step]
        latent_rows, eps_rows = list(latents.unbind(0)), list(eps.unbind(0))
        for image, terms in enumerate(self.terms):
            x, e = latent_rows[image][None], eps_rows[image][None]
            for kind, target, scale in terms:
                g = self.gradient(ctx, timestep, x, unet, self.cond_row(ctx.layout, image), kind, target, scale)
                x, e = self.update(ctx, timestep, x, e, g)
            latent_rows[image], eps_rows[image] = x[0], e[0]
        return torch.stack(latent_rows), torch.stack(eps_rows)

    def _alpha_bar(self, timestep: Tensor) -> float:
        """alpha_bar_t of the training schedule at the loop's timestep."""
        return alpha_bar_at(self.batch.scheduler.alphas_cumprod, timestep)

    def decode_sample(self, ctx: StepContext, timestep: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """The sample to decode from latent `x` and the U-Net output `out` (eps or v)."""
        v = self.feature.v_prediction
        if self.sigma_space:
            sigma = float(ctx.sigma)
            if v:
                # step_math.denoised in another order of operations (step_math keeps the
                # scheduler's); kept so that guided images stay bit for bit as they were
                return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
            return denoised(x, out, sigma)
        a = self._alpha_bar(timestep)
        x0 = denoised_alpha_bar(x, out, a, v)
        f = (1 - a) ** 0.5
        return f * x0 + (1 - f) * x

    def decode(self, sample: Tensor) -> Tensor:
        """Pixels in [0, 1] of a latent sample, differentiable (decoder checkpointed: `install`)."""
        vae = self.feature.vae
        scaled = (sample / vae.config.scaling_factor).to(vae.dtype)
        image = _wide(vae.decode(scaled).sample)
        return (image / 2 + 0.5).clamp(0, 1)

    def loss(self, ctx: StepContext, timestep: Tensor, x: Tensor, unet: RowsUNet, row: int,
             kind: str, target: Tensor, scale: float) -> Tensor:
        """The guidance loss of latent `x` (1 row) for one term (gradients must be enabled)."""
        model_input = scale_input(x, float(ctx.sigma)) if self.sigma_space else x
        out = unet(model_input, [row])
        image = self.decode(self.decode_sample(ctx, timestep, x, out))
        guide = self.feature.vgg if kind == "VGG16" else self.feature.clip
        return guide.loss(image, target, scale)

    def gradient(self, ctx: StepContext, timestep: Tensor, x: Tensor, unet: RowsUNet, row: int,
                 kind: str, target: Tensor, scale: float) -> Tensor:
        """``g = -d loss / d x`` for one image and one term."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = self.loss(ctx, timestep, x, unet, row, kind, target, scale)
            (grad,) = torch.autograd.grad(loss, x)
        logger.debug("step %d: %s loss %.6g", ctx.step, kind, float(loss.detach()))
        return -grad.detach()

    def update(self, ctx: StepContext, timestep: Tensor, x: Tensor, e: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The guided (x, eps): ``x + sigma^2 g`` on the sigma scale, else ``eps - sqrt(1-a) g``."""
        if self.sigma_space:
            return x + float(ctx.sigma) ** 2 * g.to(x.dtype), e
        a = self._alpha_bar(timestep)
        shift = -((1 - a) ** 0.5) * g
        if self.feature.v_prediction:
            shift = shift / a**0.5
        return x, e + shift.to(e.dtype)


def checkpoint_gradients(stack: ExitStack, model: torch.nn.Module) -> None:
    """Gradient checkpointing on in a diffusers `model` until `stack` closes, through its public
    switch (`enable_gradient_checkpointing` / `disable_gradient_checkpointing`); a model that
    has it on already is left alone, one that cannot checkpoint runs as it is."""
    if not hasattr(model, "enable_gradient_checkpointing") or model.is_gradient_checkpointing:
        return
    try:
        model.enable_gradient_checkpointing()
    except ValueError:  # diffusers: this model has no checkpointed blocks
        logger.debug("%s cannot checkpoint gradients; guidance decodes without", type(model).__name__)
        return
    stack.callback(model.disable_gradient_checkpointing)
