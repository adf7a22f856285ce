"""Inpainting: batches with a mask keep the source outside it, on any model.

Before the loop (strength 1) and after every step the area outside the mask (mask 0) is
replaced by the source latents noised to the next step's noise level with the image's own
img2img noise, and by the clean source latents after the last step. The start of img2img
(which timestep the source is noised at, `start_indices`), the sources and masks
(`SourceImages`) and the final pixel composite (`composite`) are in `library.sampling.img2img`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from library.records.options import has_region_mask
from library.sampling.img2img import noised
from library.sampling.patches import Batch, FeatureBase, Patch, RunSetup


class Inpainting(FeatureBase):
    """The inpainting feature: batches with a mask keep the source outside it (`KeepUnmasked`)."""

    @classmethod
    def from_run(cls, setup: RunSetup) -> Inpainting | None:
        """With `--image_path` and an inpainting `--mask_path` (not a region mask)."""
        options = setup.options
        sources = options.sources
        if sources.image_path is None or sources.mask_path is None or has_region_mask(options):
            return None
        return cls()

    def for_batch(self, batch: Batch) -> KeepUnmasked | None:
        source = batch.source
        if source is None or source.masks is None:
            return None
        keep = KeepUnmasked(batch.scheduler, batch.timesteps, source.latents, source.noise, source.masks)
        keep.from_noise = (batch.jobs[0].strength or 0) >= 1
        return keep


class KeepUnmasked(Patch):
    """Re-imposes the noised source outside the mask before the loop and after each step."""

    def __init__(self, scheduler, timesteps: torch.Tensor, source: torch.Tensor, noise: torch.Tensor,
                 masks: torch.Tensor) -> None:
        self.scheduler, self.timesteps = scheduler, timesteps
        # Schedulers that track their position (sigma schedulers) noise at their current step
        # index, which only their own `step` advances; a copy that never steps, told the index
        # of each call, keeps the noise level on the loop's step index whoever steps the batch
        # (Gradual Latent makes its steps itself).
        self.begin = getattr(scheduler, "begin_index", None)
        self.noiser = copy.copy(scheduler) if self.begin is not None else scheduler
        self.source, self.noise = source, noise.to(source)
        self.masks = masks.to(source)
        self.from_noise = True  # the loop starts from pure noise (strength 1)

    def blend(self, latents: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """`known` outside the mask; masks and source follow a latent of another size (Gradual
        Latent): source bicubic, mask bilinear, both by size."""
        masks = self.masks
        if known.shape[-2:] != latents.shape[-2:]:
            size = tuple(latents.shape[-2:])
            known = F.interpolate(known.float(), size=size, mode="bicubic", align_corners=False).to(known.dtype)
            masks = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False).to(masks.dtype)
        return known * (1 - masks) + latents * masks

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        """Before the first step: at strength 1 (pure noise) the source noised to the first
        step's level outside the mask; below 1 the loop already starts from the noised source."""
        if not self.from_noise:
            return latents
        return self.blend(latents, self._known(0))

    def after_step(self, ctx, latents: torch.Tensor) -> torch.Tensor:
        """After a step: the source at the next step's noise level (clean at the end)."""
        return self.blend(latents, self._known(ctx.step + 1))

    def _known(self, index: int) -> torch.Tensor:
        if index >= len(self.timesteps):
            return self.source
        if self.begin is not None:
            self.noiser.set_begin_index(self.begin + index)
        return noised(self.noiser, self.source, self.noise, self.timesteps[index])
