"""Attention Couple and Regional LoRA: each prompt part (split at `` AND ``) paints its region.

The feature `AttentionCouple` makes a patch (`library.sampling.patches`) for every batch whose
prompts have parts, and for every batch of a regional LoRA run (networks + region mask). Its
points:

* ``cross_attention_output``: the layer's attention runs once per part k with part k's text
  in the prompt rows (`Conditioning.parts`), and the prompt rows are merged per pixel:

      out = sum_k m_k * O_k / (sum_k m_k + 1e-4) + sum_k m_k * dO_k

  O_k is the output projection for part k without LoRA, dO_k network k's LoRA delta on it
  (its multiplier included), m_k part k's region (`library.images.region_masks`) at the resolution of the
  layer (tokens = h * w, aspect ratio of the batch's latent). Without a region mask every
  m_k = 1/n. The other rows (unconditional, empty, negative) attend to their own text once;
  the negative prompt is never split.
* ``lora_output`` (regional LoRA only; network k belongs to part k): text-encoder LoRA k only
  while part k's text is encoded, never for the negative / empty prompt; LoRA k on the
  cross-attention keys and values only in part k's prompt rows; its delta on the output
  projection goes into dO_k above; resnet time-embedding projections (no spatial axes) are
  never masked; every other U-Net delta of network k is multiplied by m_k.
* ``install``: keeps the batch's `BatchRun`, which knows the current call's `Conditioning` (the
  part texts, `run.cond`) and which text the encoder runs on (`run.text`, for the text-encoder
  rule). What one part's attention hands to the LoRA deltas inside it (the part, its rows,
  its output delta) is a `PartAttention` made for that call; nothing is kept between calls.

Pixels that no region covers get no cross-attention output (as the original). Parts beyond
the networks keep the region the mask gives them (the whole image where it gives none), and
their text acts there; the original gives them weight 0.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from library.images.metadata import FeatureMetadata
from library.images.region_masks import RegionMask, load_region_mask, resized, token_grid
from library.models.unet_blocks import cross_attention_modules
from library.records.options import Options, has_region_mask, regional_lora
from library.sampling import highres_fix
from library.sampling.patches import (
    Attend,
    Batch,
    BatchRun,
    FeatureBase,
    LoRALayer,
    Patch,
    RunSetup,
    StepContext,
)

if TYPE_CHECKING:
    from library.features.lora import Networks

logger = logging.getLogger(__name__)

EPSILON = 1e-4  # guards the merge against pixels no region covers


def prompt_rows(ctx: StepContext) -> slice:
    """The rows of the conditional (prompt) images: the 2nd group with CFG, else all."""
    images = ctx.layout.images
    return slice(0, images) if ctx.layout.copies == 1 else slice(images, 2 * images)


def region_mask(options: Options) -> RegionMask | None:
    """The `--mask_path` region mask (`library.images.region_masks`), or None when it is not one.

    With `--W` and `--H` it is resized to the size the loop makes (the 1st stage's with Highres fix)."""
    if not has_region_mask(options):
        return None
    g = options.generation
    size = None
    if g.width_given and g.height_given:
        size = (g.width, g.height)
        if options.highres.scale:
            size = highres_fix.first_stage_size(g.width, g.height, options.highres.scale)
    return load_region_mask(options.sources.mask_path, options.networks.regional_color_codes, size)


class AttentionCouple(FeatureBase):
    """The feature: prompts with ` AND ` parts, and regional LoRA (networks + region mask)."""

    def __init__(self, unet: nn.Module, regions: RegionMask | None = None, networks: Networks | None = None) -> None:
        """`networks` given: regional LoRA (each un-merged network k belongs to part k)."""
        self.regions = regions
        self.networks = networks
        self.roles = _cross_attention_roles(unet) if networks is not None else {}
        self._warned_one_part = False
        self.inpainting_mask = False  # --mask_path is an inpainting mask (from_run)
        self._warned_shared = False

    @classmethod
    def from_run(cls, setup: RunSetup) -> AttentionCouple:
        """Every run has it (any prompt line may have ` AND ` parts); with its region mask, and
        with the run's networks for regional LoRA (networks and `--mask_path` together)."""
        options = setup.options
        feature = cls(setup.model.unet, region_mask(options), setup.networks if regional_lora(options) else None)
        # an inpainting mask beside ' AND ' parts: the parts share the whole image (check_job says so)
        feature.inpainting_mask = options.sources.mask_path is not None and not has_region_mask(options)
        return feature

    def check_job(self, job) -> None:
        """Regional LoRA on a prompt without ` AND ` parts (an inpainting script of the original
        with a LoRA loaded): made as the original makes it, with one warning per run naming
        `--inpaint_with_networks`."""
        if job.prompt_parts and self.inpainting_mask and not self._warned_shared:
            self._warned_shared = True
            logger.warning("the prompt's ' AND ' parts share the whole image: --mask_path is the inpainting mask here "
                           "(no networks loaded); add --attention_couple to make it the parts' region mask")
        if self.networks is None or job.prompt_parts or self._warned_one_part:
            return
        self._warned_one_part = True
        logger.warning("--mask_path with --network_module is the networks' region mask (as the original), not an "
                       "inpainting mask: a prompt without ' AND ' parts is drawn inside the mask's first region "
                       "only; to inpaint with networks loaded, add --inpaint_with_networks")

    def metadata(self, job) -> FeatureMetadata:
        """("Region mask", file name), ("Region mode", rule) of the run's region mask, if any."""
        if self.regions is None:
            return FeatureMetadata()
        return FeatureMetadata(parameters=(("Region mask", self.regions.path.name), ("Region mode", self.regions.mode)))

    def for_batch(self, batch: Batch) -> Patch | None:
        parts = max(1, len(batch.jobs[0].prompt_parts))
        if self.networks is None:
            return CouplePatch(self._regions(parts)) if parts > 1 else None
        owners, multipliers = self.networks.regional_layers(batch)
        return RegionalLoRAPatch(self._regions(parts), self.roles, owners, multipliers)

    def _regions(self, parts: int) -> Tensor:
        if self.regions is None:
            return torch.full((parts, 1, 1), 1.0 / parts)
        return self.regions.regions(parts)


@dataclass
class PartAttention:
    """One part's attention inside one cross-attention call, for the LoRA deltas computed in it."""

    part: int
    rows: slice  # the prompt rows
    out_delta: Tensor | None = None  # the part's network's delta on the output projection (its rows)


class CouplePatch(Patch):
    """One batch's attention couple: the per-part attention and the per-pixel merge."""

    def __init__(self, regions: Tensor) -> None:
        self.regions = regions  # (parts, H, W) at the mask's size
        self.run: BatchRun | None = None
        self._sized: dict[tuple[int, int, torch.dtype], Tensor] = {}  # the regions resized (a cache)

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        self.run = run

    def masks(self, height: int, width: int, like: Tensor) -> Tensor:
        """(parts, height * width) regions at one resolution, in `like`'s device and dtype."""
        key = (height, width, like.dtype)
        if key not in self._sized:
            self._sized[key] = resized(self.regions, height, width).flatten(1).to(like.device, like.dtype)
        return self._sized[key]

    def token_masks(self, ctx: StepContext, tokens: int, like: Tensor) -> Tensor:
        h, w = token_grid(tokens, ctx.layout.latent_height, ctx.layout.latent_width)
        return self.masks(h, w, like)

    def cross_attention_output(self, ctx: StepContext, layer: str, hidden: Tensor, states: Tensor,
                               attend: Attend) -> Tensor:
        cond = self.run.cond if self.run is not None else None
        parts = cond.parts if cond is not None else ()
        rows = prompt_rows(ctx)
        masks = self.token_masks(ctx, hidden.shape[1], hidden)  # (parts, tokens)
        weights = masks / masks.sum(0, keepdim=True).clamp_min(EPSILON)
        out, merged = None, None
        for k in range(max(1, len(parts))):  # regional LoRA on a prompt of one part: its own states
            text = states
            if parts:
                text = states.clone()
                text[rows] = parts[k].layer_states(layer).to(states)
            call = PartAttention(k, rows)
            result = attend(text, call)  # the LoRA deltas inside see it as ctx.attention
            term = weights[k][None, :, None] * result[rows] + self.output_delta(call, masks[k])
            merged = term if merged is None else merged + term
            if out is None:
                out = result.clone()  # the other rows attend to their own text (the same in every part)
        out[rows] = merged
        return out

    def output_delta(self, call: PartAttention, mask: Tensor) -> Tensor | float:
        """m_k * dO_k for regional LoRA (0 for a plain attention couple)."""
        return 0.0


class RegionalLoRAPatch(CouplePatch):
    """The attention couple plus regional LoRA: network k's deltas act in part k's text and region."""

    def __init__(self, regions: Tensor, roles: dict[int, str], owners: dict[int, int],
                 multipliers: dict[int, float]) -> None:
        super().__init__(regions)
        self.roles = roles  # id(module) -> "kv" / "out" for cross-attention projections
        self.owners = owners  # id(LoRA layer) -> network (= part) index
        self.multipliers = multipliers  # network index -> this batch's multiplier

    def output_delta(self, call: PartAttention, mask: Tensor) -> Tensor | float:
        if call.out_delta is None:
            return 0.0
        return mask[None, :, None] * call.out_delta * self.multipliers.get(call.part, 1.0)

    def lora_output(self, ctx: StepContext | None, layer: LoRALayer, x: Tensor, delta: Tensor) -> Tensor:
        network = self.owners.get(id(layer))
        if network is None:
            return delta
        if ctx is None:  # the text encoder: network k on part k's prompt only
            text = self.run.text if self.run is not None else None
            return delta if text == ("prompt", network) else torch.zeros_like(delta)
        role = self.roles.get(id(layer.module))
        call = ctx.attention if isinstance(ctx.attention, PartAttention) and ctx.attention.part == network else None
        if role == "kv":
            kept = torch.zeros_like(delta)
            if call is not None:
                kept[call.rows] = delta[call.rows]
            return kept
        if role == "out":
            if call is not None:
                call.out_delta = delta[call.rows]
            return torch.zeros_like(delta)
        return self._masked(ctx, network, delta)

    def _masked(self, ctx: StepContext, network: int, delta: Tensor) -> Tensor:
        """Network `network`'s delta times its region; tensors without spatial axes unchanged."""
        if network >= self.regions.shape[0]:
            return delta
        if delta.ndim == 4:  # conv output (rows, C, h, w)
            return delta * self.masks(delta.shape[2], delta.shape[3], delta)[network].view(1, 1, *delta.shape[2:])
        if delta.ndim == 3:  # tokens (rows, h * w, C)
            return delta * self.token_masks(ctx, delta.shape[1], delta)[network].view(1, -1, 1)
        return delta  # (rows, C): the resnets' time-embedding projections


def _cross_attention_roles(unet: nn.Module) -> dict[int, str]:
    """id(module) -> "kv" for the cross-attention key/value projections, "out" for the output's."""
    roles: dict[int, str] = {}
    for modules in cross_attention_modules(unet).values():
        for attn in modules:
            roles[id(attn.to_k)] = roles[id(attn.to_v)] = "kv"
            roles[id(attn.to_out[0])] = "out"
    return roles
