"""Deep Shrink: the U-Net's deep layers run on a smaller hidden state during the first steps.

Written by hand (no library has it), with the original's semantics (`docs/deep_shrink.md`):

* Before ``down_blocks[depth]`` runs (depth 0..3 for SD 1.x/2.x), its input is shrunk when
  ``(depth == depth_1 and t >= timesteps_1) or (depth == depth_2 and timesteps_2 <= t < timesteps_1)``,
  t being the timestep the loop passes to the U-Net; no ``depth_2`` never matches. The two
  conditions exclude each other in time, so a U-Net call shrinks at most once.
* The shrink is ``interpolate(h, scale_factor=ratio, mode="bicubic", align_corners=False)``
  (by scale factor, floor of size * ratio), in fp32 for half-precision states. The skip saved
  before the shrink stays full size; everything after it runs small.
* In every up block, before each concat with a skip, a hidden state whose size differs from the
  skip's is resized to it (bicubic, align_corners False): once per call, at the first full-size skip.
* With ControlNet the ControlNet's down path is shrunk the same way (its residuals then fit the
  U-Net's small skips); the original silently skips Deep Shrink on ControlNet steps.

A prompt line's `--dsd1 --dst1 --dsd2 --dst2 --dsr` make that line's images' own settings
(`with_overrides`), part of the Job and its batch key: they never leak into other lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.records.deep_shrink_settings import DeepShrink
from library.sampling.patches import Batch, FeatureBase, Patch, RunSetup, StepContext


def bicubic(h: torch.Tensor, *, scale_factor: float | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic resize (align_corners False), computed in fp32 for half-precision tensors."""
    if h.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(h.float(), size=size, scale_factor=scale_factor, mode="bicubic",
                             align_corners=False).to(h.dtype)
    return F.interpolate(h, size=size, scale_factor=scale_factor, mode="bicubic", align_corners=False)


class DeepShrinkFeature(FeatureBase):
    """The patch owner's feature: batches whose Jobs have Deep Shrink settings get `ShrinkDeepLayers`."""

    def __init__(self, down_blocks: int) -> None:
        self.down_blocks = down_blocks

    @classmethod
    def from_run(cls, setup: RunSetup) -> DeepShrinkFeature:
        """Every run has it (any prompt line may set Deep Shrink); the command line's depth is
        checked here, so a wrong one stops the run up front (exit 2)."""
        feature = cls(len(setup.model.unet.down_blocks))
        feature.check_settings(setup.options.generation.deep_shrink)
        return feature

    def check_job(self, job) -> None:
        """A depth outside the U-Net's down blocks is the user's mistake (the line is skipped)."""
        self.check_settings(job.deep_shrink)

    def check_settings(self, settings: DeepShrink | None) -> None:
        if settings is None:
            return
        for name, depth in (("depth 1 (--ds_depth_1/--dsd1)", settings.depth_1),
                            ("depth 2 (--ds_depth_2/--dsd2)", settings.depth_2)):
            if depth is not None and not 0 <= depth < self.down_blocks:
                raise UserError(f"Deep Shrink {name} {depth}: this U-Net's down blocks are 0 to {self.down_blocks - 1}")

    def for_batch(self, batch: Batch) -> ShrinkDeepLayers | None:
        settings = batch.jobs[0].deep_shrink
        return ShrinkDeepLayers(settings) if settings is not None and settings.ratio != 1 else None


class ShrinkDeepLayers(Patch):
    """Shrinks one down block's input on the gated steps; the up path resizes back to the skips."""

    def __init__(self, settings: DeepShrink) -> None:
        self.settings = settings

    def down_block_input(self, ctx: StepContext, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        if not self.settings.shrinks(depth, ctx.timestep):
            return hidden
        return bicubic(hidden, scale_factor=self.settings.ratio)

    def before_skip_concat(self, ctx: StepContext, up_index: int, layer: int, hidden: torch.Tensor,
                           skip: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2:] == skip.shape[-2:]:
            return hidden
        return bicubic(hidden, size=tuple(skip.shape[-2:]))
