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
* SDXL: depth 0..8 is the original's LDM input block (`library.sampling.entry_blocks`: 0 conv_in,
  1-2 level 0, 3 downsample, 4-5 level 1, 6 downsample, 7-8 level 2). Depth 0 shrinks the
  U-Net's input itself, so every skip is small; the output is resized back to the input's size
  before the U-Net's final norm and convolution, as the original does.
* With ControlNet the ControlNet's down path is shrunk the same way (its residuals then fit the
  U-Net's small skips); the original silently skips Deep Shrink on ControlNet steps.

A prompt line's `--dsd1 --dst1 --dsd2 --dst2 --dsr` make that line's images' own settings
(`with_overrides`), part of the Job and its batch key: they never leak into other lines.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.records.deep_shrink_settings import DeepShrink
from library.sampling.entry_blocks import entry_blocks, uses_input_blocks
from library.sampling.patches import Batch, BatchRun, FeatureBase, Patch, RunSetup, StepContext


def bicubic(h: torch.Tensor, *, scale_factor: float | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic resize (align_corners False), computed in fp32 for half-precision tensors."""
    if h.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(h.float(), size=size, scale_factor=scale_factor, mode="bicubic",
                             align_corners=False).to(h.dtype)
    return F.interpolate(h, size=size, scale_factor=scale_factor, mode="bicubic", align_corners=False)


class DeepShrinkFeature(FeatureBase):
    """The patch owner's feature: batches whose Jobs have Deep Shrink settings get `ShrinkDeepLayers`."""

    def __init__(self, down_blocks: int, unet: torch.nn.Module | None = None, vae_scale: int = 8) -> None:
        self.down_blocks = down_blocks  # how many depths there are (SDXL: its nine input blocks)
        self.unet = unet if unet is not None and uses_input_blocks(unet) else None  # SDXL: depth 0's final resize
        self.vae_scale = vae_scale

    @classmethod
    def from_run(cls, setup: RunSetup) -> DeepShrinkFeature:
        """Every run has it (any prompt line may set Deep Shrink); the command line's depth is
        checked here, so a wrong one stops the run up front (exit 2)."""
        unet = setup.model.unet
        vae_levels = len(getattr(setup.model.vae.config, "block_out_channels", ())) or 4
        feature = cls(len(entry_blocks(unet)), unet, 2 ** (vae_levels - 1))
        feature.check_settings(setup.options.generation.deep_shrink)
        return feature

    def check_job(self, job) -> None:
        """A depth outside the U-Net's down blocks, or a ratio that shrinks the image's state to
        0 pixels, is the user's mistake (the line is skipped)."""
        self.check_settings(job.deep_shrink)
        if job.deep_shrink is not None and job.deep_shrink.ratio != 1 and self.unet is None:  # SD 1.x/2.x depths
            job.deep_shrink.check_size(job.width, job.height, self.vae_scale)

    def check_settings(self, settings: DeepShrink | None) -> None:
        if settings is None:
            return
        for name, depth in (("depth 1 (--ds_depth_1/--dsd1)", settings.depth_1),
                            ("depth 2 (--ds_depth_2/--dsd2)", settings.depth_2)):
            if depth is not None and not 0 <= depth < self.down_blocks:
                blocks = "input blocks" if self.unet is not None else "down blocks"
                raise UserError(f"Deep Shrink {name} {depth}: this U-Net's {blocks} are 0 to {self.down_blocks - 1}")

    def for_batch(self, batch: Batch) -> ShrinkDeepLayers | None:
        settings = batch.jobs[0].deep_shrink
        if settings is None or settings.ratio == 1:
            return None
        shrinks_input = self.unet is not None and 0 in (settings.depth_1, settings.depth_2)
        return ShrinkDeepLayers(settings, self.unet if shrinks_input else None)


class ShrinkDeepLayers(Patch):
    """Shrinks one down block's input on the gated steps; the up path resizes back to the skips.
    With `output_of` (an SDXL U-Net whose input itself shrinks) its output is resized back too."""

    def __init__(self, settings: DeepShrink, output_of: torch.nn.Module | None = None) -> None:
        self.settings = settings
        self.output_of = output_of

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        if self.output_of is None:
            return

        def full_size(module, args):
            hidden, size = args[0], tuple(run.sample.shape[-2:])
            return (bicubic(hidden, size=size), *args[1:]) if tuple(hidden.shape[-2:]) != size else None

        stack.callback(self.output_of.conv_norm_out.register_forward_pre_hook(full_size).remove)

    def down_block_input(self, ctx: StepContext, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        if not self.settings.shrinks(depth, ctx.timestep):
            return hidden
        return bicubic(hidden, scale_factor=self.settings.ratio)

    def before_skip_concat(self, ctx: StepContext, up_index: int, layer: int, hidden: torch.Tensor,
                           skip: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2:] == skip.shape[-2:]:
            return hidden
        return bicubic(hidden, size=tuple(skip.shape[-2:]))
