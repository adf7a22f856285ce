"""The LDM (original SD) block numbering of a diffusers U-Net: one table for every user.

The original Stable Diffusion U-Net (CompVis ``openaimodel``) numbers its blocks differently
from diffusers, and everything that meets the outside world speaks LDM: single-file
checkpoints (``model.diffusion_model.input_blocks.1.1...``), kohya LoRA names
(``lora_unet_input_blocks_1_1_proj_in``), XTI files (``IN01`` ... ``OUT11``), and the
per-batch patch points that features attach to. This module computes that numbering once,
as a tuple of frozen `LdmBlock` records, and the rest of the project looks names up here.

The layout, from the structure of the U-Net's config (block types, layers per block):

* ``input_blocks`` (``INnn``): 0 is ``conv_in``; then per down block one entry per resnet
  (resnet at ``.0``, its attention at ``.1`` if the block has attention) and, for every down
  block but the deepest, one entry for its downsampler (at ``.0``; its conv is ``.0.op``).
* ``middle_block`` (``MID``): resnet ``.0``, attention ``.1``, resnet ``.2`` (a mid block
  without attention has its one resnet at ``.0``).
* ``output_blocks`` (``OUTnn``): one entry per up-block resnet (up blocks have one layer more
  than their down block: the skip of the downsampler), resnet at ``.0``, attention at ``.1``;
  the last entry of each up block but the last also carries the upsampler, after the
  attention (``.2``) or after the resnet when the block has no attention (``.1``).

So SD 1.x / 2.x get IN00-IN11, MID, OUT00-OUT11, and the project's tiny models (1 layer per
block, two levels) get IN00-IN03, MID, OUT00-OUT03. The table depends only on the config,
so it is computed once per U-Net layout and shared (it works from a config alone, which is
all the checkpoint exporter has); the tests check it against the modules diffusers builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from torch import nn

BlockKind = Literal["down", "mid", "up"]
#: What a diffusers module is within its LDM block; "other" is a module outside the blocks.
PartRole = Literal["conv_in", "resnet", "attention", "downsampler", "upsampler", "other"]
#: A U-Net or ControlNet (its ``config`` is read) or such a model's config.
UnetLike = nn.Module | Mapping[str, Any]

#: diffusers ResnetBlock2D child -> LDM ResBlock child.
UNET_RESNET_RENAMES: Mapping[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RENAMES: Mapping[str, Mapping[str, str]] = {
    "resnet": UNET_RESNET_RENAMES,
    "downsampler": {"conv": "op"},  # Downsample2D.conv is LDM's Downsample.op
}

#: U-Net modules outside the numbered blocks (the embeddings and the output head).
OTHER_MODULES: Mapping[str, str] = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # Class / additional embeddings: not in SD 1.x / 2.x, but the LDM layout is fixed.
    "class_embedding": "label_emb",  # an nn.Embedding: label_emb.weight
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@dataclass(frozen=True)
class LdmPart:
    """One diffusers module and its place in the LDM layout.

    `path` is the diffusers module path (``down_blocks.0.resnets.0``), `ldm_path` the LDM one
    (``input_blocks.1.0``); the last component of `ldm_path` is the part's sub-index in its
    LDM block. Children keep their names except where `renames` says otherwise (resnet
    children, and a downsampler's ``conv`` which LDM calls ``op``).
    """

    role: PartRole
    path: str
    ldm_path: str

    @property
    def sub_index(self) -> str:
        """The part's index inside its LDM block ("0", "1", "2"); "" for modules outside blocks."""
        return self.ldm_path.rsplit(".", 1)[1] if self.role != "other" else ""

    @property
    def renames(self) -> Mapping[str, str]:
        """diffusers child module path -> LDM child module path (children not listed keep theirs)."""
        return _RENAMES.get(self.role, {})

    def ldm_child(self, child: str) -> str:
        """The LDM path of `child`, a module path below this part ("" for the part itself)."""
        if not child:
            return self.ldm_path
        return f"{self.ldm_path}.{self.renames.get(child, child)}"


@dataclass(frozen=True)
class LdmBlock:
    """One entry of ``input_blocks`` / ``middle_block`` / ``output_blocks``.

    `name` is the XTI-style name ("IN01", "MID", "OUT08"), `ldm_prefix` the LDM module path
    ("input_blocks.1"). `block_index` is i of diffusers' ``down_blocks[i]`` / ``up_blocks[i]``
    (None for IN00 = conv_in and for MID); `layer` is j of that block's ``resnets[j]`` (None
    for conv_in, a downsampler entry and MID). `parts` are in LDM sub-index order.
    """

    name: str
    ldm_prefix: str
    kind: BlockKind
    block_index: int | None
    layer: int | None
    parts: tuple[LdmPart, ...]

    def part(self, role: PartRole) -> LdmPart | None:
        """The block's first part with `role`, if any (MID's second resnet is in `parts`)."""
        return next((p for p in self.parts if p.role == role), None)

    @property
    def resnet(self) -> LdmPart | None:
        return self.part("resnet")

    @property
    def attention(self) -> LdmPart | None:
        return self.part("attention")

    @property
    def sampler(self) -> LdmPart | None:
        """The downsampler or upsampler this entry holds, if any."""
        return self.part("downsampler") or self.part("upsampler")


class _Layout(NamedTuple):
    """What the numbering depends on; hashable, so tables are cached per layout."""

    down_types: tuple[str, ...]
    up_types: tuple[str, ...]
    layers: tuple[int, ...]  # resnets per down block
    mid_type: str | None


class _Table(NamedTuple):
    blocks: tuple[LdmBlock, ...]
    by_name: Mapping[str, LdmBlock]
    by_path: Mapping[str, LdmPart]  # diffusers module path -> part (blocks' parts and others)


def has_block_layout(unet: UnetLike) -> bool:
    """Whether `unet` says its block layout: a config, or a model with a diffusers config that
    has down blocks (a toy module in a test has none, so it has no LDM names)."""
    config = unet if isinstance(unet, Mapping) else getattr(unet, "config", None)
    return isinstance(config, Mapping) and "down_block_types" in config


def _config_of(unet: UnetLike) -> Mapping[str, Any]:
    if isinstance(unet, Mapping):
        return unet
    config = getattr(unet, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{type(unet).__name__} has no diffusers config to read its block layout from")
    return config


def _per_block(value: int | Sequence[int], blocks: int, name: str) -> tuple[int, ...]:
    """Expand a per-block config value (an int or one entry per block) to a tuple."""
    if isinstance(value, int):
        return (value,) * blocks
    values = tuple(int(v) for v in value)
    if len(values) != blocks:
        raise ValueError(f"U-Net config {name} has {len(values)} entries for {blocks} blocks")
    return values


def _layout(unet: UnetLike) -> _Layout:
    """The block layout of a U-Net (or of a ControlNet: down and mid blocks, no up blocks)."""
    config = _config_of(unet)
    down_types = tuple(config["down_block_types"])
    up_types = tuple(config.get("up_block_types") or ())
    if up_types and len(up_types) != len(down_types):
        raise ValueError(f"U-Net config has {len(down_types)} down blocks but {len(up_types)} up blocks")
    layers = _per_block(config["layers_per_block"], len(down_types), "layers_per_block")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return _Layout(down_types, up_types, layers, mid_type)


def _has_attention(block_type: str) -> bool:
    """diffusers' attention blocks are the ones named *Attn* (CrossAttnDownBlock2D, ...)."""
    return "Attn" in block_type


def _block(name: str, prefix: str, kind: BlockKind, index: int | None, layer: int | None,
           parts: Sequence[tuple[PartRole, str]]) -> LdmBlock:
    """A block record whose parts take the sub-indices 0, 1, 2 in the order given."""
    records = tuple(LdmPart(role, path, f"{prefix}.{slot}") for slot, (role, path) in enumerate(parts))
    return LdmBlock(name, prefix, kind, index, layer, records)


def _layer_parts(side: str, index: int, layer: int, attention: bool) -> list[tuple[PartRole, str]]:
    parts: list[tuple[PartRole, str]] = [("resnet", f"{side}.{index}.resnets.{layer}")]
    if attention:
        parts.append(("attention", f"{side}.{index}.attentions.{layer}"))
    return parts


@lru_cache(maxsize=32)
def _table(layout: _Layout) -> _Table:
    blocks = [_block("IN00", "input_blocks.0", "down", None, None, [("conv_in", "conv_in")])]
    n = 0
    last = len(layout.down_types) - 1
    for i, (block_type, layers) in enumerate(zip(layout.down_types, layout.layers)):
        for j in range(layers):
            n += 1
            parts = _layer_parts("down_blocks", i, j, _has_attention(block_type))
            blocks.append(_block(f"IN{n:02d}", f"input_blocks.{n}", "down", i, j, parts))
        if i < last:  # every level but the deepest halves the resolution
            n += 1
            parts = [("downsampler", f"down_blocks.{i}.downsamplers.0")]
            blocks.append(_block(f"IN{n:02d}", f"input_blocks.{n}", "down", i, None, parts))

    if layout.mid_type is not None:
        parts = [("resnet", "mid_block.resnets.0")]
        if _has_attention(layout.mid_type):
            parts += [("attention", "mid_block.attentions.0"), ("resnet", "mid_block.resnets.1")]
        blocks.append(_block("MID", "middle_block", "mid", None, None, parts))

    n = -1
    for i, (block_type, layers) in enumerate(zip(layout.up_types, reversed(layout.layers))):
        for j in range(layers + 1):
            n += 1
            parts = _layer_parts("up_blocks", i, j, _has_attention(block_type))
            if j == layers and i < last:
                parts.append(("upsampler", f"up_blocks.{i}.upsamplers.0"))
            blocks.append(_block(f"OUT{n:02d}", f"output_blocks.{n}", "up", i, j, parts))

    by_path = {part.path: part for block in blocks for part in block.parts}
    by_path.update({path: LdmPart("other", path, ldm) for path, ldm in OTHER_MODULES.items()})
    return _Table(tuple(blocks), {block.name: block for block in blocks}, by_path)


def ldm_blocks(unet: UnetLike) -> tuple[LdmBlock, ...]:
    """The LDM blocks of `unet` (a U-Net, ControlNet or config) in order: IN.., MID, OUT.."""
    return _table(_layout(unet)).blocks


def ldm_block(unet: UnetLike, name: str) -> LdmBlock:
    """The block called `name` ("IN04", "MID", "OUT08"); KeyError naming the valid ones."""
    table = _table(_layout(unet))
    try:
        return table.by_name[name]
    except KeyError:
        raise KeyError(f"this U-Net has no block {name!r}; its blocks are {', '.join(table.by_name)}") from None


def blocks_of(unet: UnetLike, kind: Literal["down", "up"], index: int) -> tuple[LdmBlock, ...]:
    """The entries of ``down_blocks[index]`` / ``up_blocks[index]``: its layers in resnet
    order, then (down blocks) the downsampler's entry."""
    return tuple(b for b in ldm_blocks(unet) if b.kind == kind and b.block_index == index)


def layer_names(unet: UnetLike, kind: Literal["down", "up"], index: int) -> tuple[str, ...]:
    """The LDM names of the resnet layers of ``down_blocks[index]`` / ``up_blocks[index]``,
    in resnet order (``layer_names(sd15, "up", 1) == ("OUT03", "OUT04", "OUT05")``)."""
    return tuple(b.name for b in blocks_of(unet, kind, index) if b.layer is not None)


def ldm_parts(unet: UnetLike) -> tuple[LdmPart, ...]:
    """Every diffusers module with an LDM counterpart: the blocks' parts in block order, then
    the modules outside the blocks (`OTHER_MODULES`)."""
    return tuple(_table(_layout(unet)).by_path.values())


def ldm_module_path(unet: UnetLike, path: str) -> str | None:
    """The LDM module path of a diffusers U-Net module path, or None if it has none.

    ``down_blocks.0.downsamplers.0.conv`` -> ``input_blocks.3.0.op``,
    ``up_blocks.1.attentions.2.proj_out`` -> ``output_blocks.5.1.proj_out``.
    The longest known module prefix of `path` decides.
    """
    by_path = _table(_layout(unet)).by_path
    names = path.split(".")
    for cut in range(len(names), 0, -1):
        part = by_path.get(".".join(names[:cut]))
        if part is not None:
            return part.ldm_child(".".join(names[cut:]))
    return None


def cross_attention_modules(unet: nn.Module) -> dict[str, list[nn.Module]]:
    """LDM block name -> the cross-attention (``attn2``) modules of that block, in U-Net order.

    Only blocks with at least one ``attn2`` appear: SD 1.x / 2.x give the 16 names of kohya's
    XTI format (IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03-OUT11).
    """
    layers: dict[str, list[nn.Module]] = {}
    for block in ldm_blocks(unet):
        for part in block.parts:
            if part.role != "attention":
                continue
            transformer = unet.get_submodule(part.path)
            for transformer_block in getattr(transformer, "transformer_blocks", ()):
                attn2 = getattr(transformer_block, "attn2", None)
                if attn2 is not None:
                    layers.setdefault(block.name, []).append(attn2)
    return layers


def cross_attention_layer_names(unet: nn.Module) -> list[str]:
    """The LDM names of the U-Net's cross-attention layers, in U-Net order (XTI files' keys)."""
    return list(cross_attention_modules(unet))
