"""What a Deep Shrink depth (the patch owner's `down_block_input` point) indexes in a U-Net.

SD 1.x/2.x: depth d is ``down_blocks[d]`` (0..3), the original tool's rule for those models.
SDXL: depth d is the original's LDM input block d (0..8) of SDXL's U-Net, which diffusers
splits differently, so the blocks are listed here:

====  =====================================  =====================================
depth  LDM input block                        diffusers module
====  =====================================  =====================================
0      conv_in                                ``conv_in``
1, 2   level 0 resnets (no attention)         ``down_blocks[0].resnets[0]``, ``[1]``
3      downsample                             ``down_blocks[0].downsamplers[0]``
4, 5   level 1 resnet + transformer           ``down_blocks[1].resnets[0]``, ``[1]`` (the attention follows)
6      downsample                             ``down_blocks[1].downsamplers[0]``
7, 8   level 2 resnet + transformer           ``down_blocks[2].resnets[0]``, ``[1]``
====  =====================================  =====================================

A block's input is shrunk before it runs: the skip it saves (and everything after it) is small;
the up path resizes back before each skip concat. A model whose U-Net has SDXL's added
conditioning (``addition_embed_type="text_time"``: SDXL's U-Net and ControlNets) uses the table.
"""

from __future__ import annotations

from torch import nn


def uses_input_blocks(model: nn.Module) -> bool:
    """Whether Deep Shrink depths of `model` index SDXL's input blocks (not its down blocks)."""
    return getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"


def entry_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules whose inputs depth 0, 1, ... shrink (module docstring)."""
    if not uses_input_blocks(model):
        return list(model.down_blocks)
    blocks: list[nn.Module] = [model.conv_in]
    for down in model.down_blocks:
        blocks.extend(down.resnets)
        blocks.extend(down.downsamplers or ())
    return blocks
