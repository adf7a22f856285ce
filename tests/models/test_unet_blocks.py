"""The LDM block table of the U-Net (library.models.unet_blocks): exact tables for SD 1.5 and
the tiny models, agreement with the modules diffusers builds, and the lookups."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from library.models.tiny import unet_config
from library.models.unet_blocks import (
    LdmBlock,
    blocks_of,
    cross_attention_modules,
    has_block_layout,
    ldm_block,
    ldm_blocks,
    ldm_module_path,
    ldm_parts,
    layer_names,
)

KOHYA_XTI_LAYERS = [
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
]


def on_meta(**config) -> UNet2DConditionModel:
    """A U-Net built without memory (weights on the meta device)."""
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def sd15() -> UNet2DConditionModel:
    return on_meta(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
    )


def sd2() -> UNet2DConditionModel:
    return on_meta(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    )


def rows(blocks: tuple[LdmBlock, ...]) -> list[tuple]:
    """The table as plain tuples: (name, prefix, kind, block index, layer, parts)."""
    return [
        (b.name, b.ldm_prefix, b.kind, b.block_index, b.layer, [(p.role, p.path, p.ldm_path) for p in b.parts])
        for b in blocks
    ]


def resnet(side: str, i: int, j: int, at: str) -> tuple[str, str, str]:
    return ("resnet", f"{side}.{i}.resnets.{j}", at)


def attention(side: str, i: int, j: int, at: str) -> tuple[str, str, str]:
    return ("attention", f"{side}.{i}.attentions.{j}", at)


SD15_TABLE = [
    ("IN00", "input_blocks.0", "down", None, None, [("conv_in", "conv_in", "input_blocks.0.0")]),
    ("IN01", "input_blocks.1", "down", 0, 0,
     [resnet("down_blocks", 0, 0, "input_blocks.1.0"), attention("down_blocks", 0, 0, "input_blocks.1.1")]),
    ("IN02", "input_blocks.2", "down", 0, 1,
     [resnet("down_blocks", 0, 1, "input_blocks.2.0"), attention("down_blocks", 0, 1, "input_blocks.2.1")]),
    ("IN03", "input_blocks.3", "down", 0, None,
     [("downsampler", "down_blocks.0.downsamplers.0", "input_blocks.3.0")]),
    ("IN04", "input_blocks.4", "down", 1, 0,
     [resnet("down_blocks", 1, 0, "input_blocks.4.0"), attention("down_blocks", 1, 0, "input_blocks.4.1")]),
    ("IN05", "input_blocks.5", "down", 1, 1,
     [resnet("down_blocks", 1, 1, "input_blocks.5.0"), attention("down_blocks", 1, 1, "input_blocks.5.1")]),
    ("IN06", "input_blocks.6", "down", 1, None,
     [("downsampler", "down_blocks.1.downsamplers.0", "input_blocks.6.0")]),
    ("IN07", "input_blocks.7", "down", 2, 0,
     [resnet("down_blocks", 2, 0, "input_blocks.7.0"), attention("down_blocks", 2, 0, "input_blocks.7.1")]),
    ("IN08", "input_blocks.8", "down", 2, 1,
     [resnet("down_blocks", 2, 1, "input_blocks.8.0"), attention("down_blocks", 2, 1, "input_blocks.8.1")]),
    ("IN09", "input_blocks.9", "down", 2, None,
     [("downsampler", "down_blocks.2.downsamplers.0", "input_blocks.9.0")]),
    ("IN10", "input_blocks.10", "down", 3, 0, [resnet("down_blocks", 3, 0, "input_blocks.10.0")]),
    ("IN11", "input_blocks.11", "down", 3, 1, [resnet("down_blocks", 3, 1, "input_blocks.11.0")]),
    ("MID", "middle_block", "mid", None, None,
     [("resnet", "mid_block.resnets.0", "middle_block.0"), ("attention", "mid_block.attentions.0", "middle_block.1"),
      ("resnet", "mid_block.resnets.1", "middle_block.2")]),
    ("OUT00", "output_blocks.0", "up", 0, 0, [resnet("up_blocks", 0, 0, "output_blocks.0.0")]),
    ("OUT01", "output_blocks.1", "up", 0, 1, [resnet("up_blocks", 0, 1, "output_blocks.1.0")]),
    ("OUT02", "output_blocks.2", "up", 0, 2,
     [resnet("up_blocks", 0, 2, "output_blocks.2.0"), ("upsampler", "up_blocks.0.upsamplers.0", "output_blocks.2.1")]),
    ("OUT03", "output_blocks.3", "up", 1, 0,
     [resnet("up_blocks", 1, 0, "output_blocks.3.0"), attention("up_blocks", 1, 0, "output_blocks.3.1")]),
    ("OUT04", "output_blocks.4", "up", 1, 1,
     [resnet("up_blocks", 1, 1, "output_blocks.4.0"), attention("up_blocks", 1, 1, "output_blocks.4.1")]),
    ("OUT05", "output_blocks.5", "up", 1, 2,
     [resnet("up_blocks", 1, 2, "output_blocks.5.0"), attention("up_blocks", 1, 2, "output_blocks.5.1"),
      ("upsampler", "up_blocks.1.upsamplers.0", "output_blocks.5.2")]),
    ("OUT06", "output_blocks.6", "up", 2, 0,
     [resnet("up_blocks", 2, 0, "output_blocks.6.0"), attention("up_blocks", 2, 0, "output_blocks.6.1")]),
    ("OUT07", "output_blocks.7", "up", 2, 1,
     [resnet("up_blocks", 2, 1, "output_blocks.7.0"), attention("up_blocks", 2, 1, "output_blocks.7.1")]),
    ("OUT08", "output_blocks.8", "up", 2, 2,
     [resnet("up_blocks", 2, 2, "output_blocks.8.0"), attention("up_blocks", 2, 2, "output_blocks.8.1"),
      ("upsampler", "up_blocks.2.upsamplers.0", "output_blocks.8.2")]),
    ("OUT09", "output_blocks.9", "up", 3, 0,
     [resnet("up_blocks", 3, 0, "output_blocks.9.0"), attention("up_blocks", 3, 0, "output_blocks.9.1")]),
    ("OUT10", "output_blocks.10", "up", 3, 1,
     [resnet("up_blocks", 3, 1, "output_blocks.10.0"), attention("up_blocks", 3, 1, "output_blocks.10.1")]),
    ("OUT11", "output_blocks.11", "up", 3, 2,
     [resnet("up_blocks", 3, 2, "output_blocks.11.0"), attention("up_blocks", 3, 2, "output_blocks.11.1")]),
]

# Tiny models: 1 layer per block; attention in down block 0 and up block 1 (SD's pattern).
TINY_TABLE = [
    ("IN00", "input_blocks.0", "down", None, None, [("conv_in", "conv_in", "input_blocks.0.0")]),
    ("IN01", "input_blocks.1", "down", 0, 0,
     [resnet("down_blocks", 0, 0, "input_blocks.1.0"), attention("down_blocks", 0, 0, "input_blocks.1.1")]),
    ("IN02", "input_blocks.2", "down", 0, None,
     [("downsampler", "down_blocks.0.downsamplers.0", "input_blocks.2.0")]),
    ("IN03", "input_blocks.3", "down", 1, 0, [resnet("down_blocks", 1, 0, "input_blocks.3.0")]),
    ("MID", "middle_block", "mid", None, None,
     [("resnet", "mid_block.resnets.0", "middle_block.0"), ("attention", "mid_block.attentions.0", "middle_block.1"),
      ("resnet", "mid_block.resnets.1", "middle_block.2")]),
    ("OUT00", "output_blocks.0", "up", 0, 0, [resnet("up_blocks", 0, 0, "output_blocks.0.0")]),
    ("OUT01", "output_blocks.1", "up", 0, 1,
     [resnet("up_blocks", 0, 1, "output_blocks.1.0"), ("upsampler", "up_blocks.0.upsamplers.0", "output_blocks.1.1")]),
    ("OUT02", "output_blocks.2", "up", 1, 0,
     [resnet("up_blocks", 1, 0, "output_blocks.2.0"), attention("up_blocks", 1, 0, "output_blocks.2.1")]),
    ("OUT03", "output_blocks.3", "up", 1, 1,
     [resnet("up_blocks", 1, 1, "output_blocks.3.0"), attention("up_blocks", 1, 1, "output_blocks.3.1")]),
]


def test_sd15_table():
    unet = sd15()
    assert rows(ldm_blocks(unet)) == SD15_TABLE
    assert ldm_blocks(sd2()) == ldm_blocks(unet)  # SD 2.x has the same block layout
    assert ldm_blocks(dict(unet.config)) is ldm_blocks(unet)  # one table per layout, from the config alone


def test_sd15_named_parts():
    unet = sd15()
    assert ldm_block(unet, "IN00").part("conv_in").path == "conv_in"
    in01 = ldm_block(unet, "IN01")
    assert (in01.resnet.path, in01.attention.path, in01.sampler) == (
        "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", None)
    in03 = ldm_block(unet, "IN03")
    assert (in03.resnet, in03.attention, in03.sampler.path) == (None, None, "down_blocks.0.downsamplers.0")
    assert in03.sampler.ldm_child("conv") == "input_blocks.3.0.op"
    out02, out05 = ldm_block(unet, "OUT02"), ldm_block(unet, "OUT05")
    assert (out02.sampler.path, out02.sampler.ldm_path, out02.sampler.sub_index) == (
        "up_blocks.0.upsamplers.0", "output_blocks.2.1", "1")
    assert (out05.sampler.path, out05.sampler.ldm_path, out05.sampler.sub_index) == (
        "up_blocks.1.upsamplers.0", "output_blocks.5.2", "2")
    assert ldm_block(unet, "OUT11").sampler is None
    mid = ldm_block(unet, "MID")
    assert [p.sub_index for p in mid.parts] == ["0", "1", "2"]
    with pytest.raises(KeyError, match="no block 'IN12'; its blocks are IN00, IN01, .*, OUT11"):
        ldm_block(unet, "IN12")


def test_sd15_layers_per_block():
    unet = sd15()
    assert [layer_names(unet, "down", d) for d in range(4)] == [
        ("IN01", "IN02"), ("IN04", "IN05"), ("IN07", "IN08"), ("IN10", "IN11")]
    assert [layer_names(unet, "up", i) for i in range(4)] == [
        ("OUT00", "OUT01", "OUT02"), ("OUT03", "OUT04", "OUT05"), ("OUT06", "OUT07", "OUT08"),
        ("OUT09", "OUT10", "OUT11")]
    assert [b.name for b in blocks_of(unet, "down", 0)] == ["IN01", "IN02", "IN03"]
    assert [b.name for b in blocks_of(unet, "down", 3)] == ["IN10", "IN11"]
    assert [b.layer for b in blocks_of(unet, "up", 2)] == [0, 1, 2]


def test_module_paths():
    unet = sd15()
    known = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
        "down_blocks.0.downsamplers.0": "input_blocks.3.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.resnets.2.conv2": "output_blocks.11.0.out_layers.3",
        "conv_out": "out.2",
    }
    assert {path: ldm_module_path(unet, path) for path in known} == known
    assert ldm_module_path(unet, "up_blocks.3.upsamplers.0.conv") is None  # the last up block has none
    assert ldm_module_path(unet, "time_proj") is None  # no weights, no LDM module


def test_tiny_tables():
    for kind in ("sd1", "sd2"):
        unet = on_meta(**unet_config(kind))
        assert rows(ldm_blocks(unet)) == TINY_TABLE
        assert list(cross_attention_modules(unet)) == ["IN01", "MID", "OUT02", "OUT03"]
        assert layer_names(unet, "up", 0) == ("OUT00", "OUT01")


def test_cross_attention_modules_are_the_attn2_modules_in_unet_order():
    for unet in (sd15(), sd2()):
        layers = cross_attention_modules(unet)
        assert list(layers) == KOHYA_XTI_LAYERS
        # Forward order: down blocks, mid block, up blocks (diffusers registers mid_block last).
        in_order = [m for part in ("down_blocks", "mid_block", "up_blocks")
                    for name, m in unet.named_modules() if name.startswith(part) and name.endswith(".attn2")]
        assert [m for modules in layers.values() for m in modules] == in_order
        assert layers["IN04"] == [unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2]


LAYOUTS = {
    "sd15": lambda: sd15(),
    "tiny": lambda: on_meta(**unet_config("sd1")),
    # Three levels, attention only in the deeper ones, a mid block without attention.
    "other": lambda: on_meta(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=(1, 3, 2), cross_attention_dim=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
        mid_block_type="UNetMidBlock2D",
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_table_matches_the_modules_diffusers_builds(layout):
    """The table is computed from the config; every part must be a module the U-Net has, and
    every resnet / attention / sampler / conv_in module of the U-Net must be in the table."""
    unet = LAYOUTS[layout]()
    modules = dict(unet.named_modules())
    parts = [p.path for b in ldm_blocks(unet) for p in b.parts]
    assert len(parts) == len(set(parts)) and all(path in modules for path in parts)
    listed = {
        f"{side}.{i}.{kind}.{j}"
        for side in ("down_blocks", "up_blocks")
        for i, block in enumerate(getattr(unet, side))
        for kind in ("resnets", "attentions", "downsamplers", "upsamplers")
        for j in range(len(getattr(block, kind, None) or ()))
    }
    listed |= {f"mid_block.{kind}.{j}" for kind in ("resnets", "attentions")
               for j in range(len(getattr(unet.mid_block, kind, None) or ()))}
    assert sorted(parts) == sorted(listed | {"conv_in"})
    # Besides the blocks' parts, the modules outside the blocks that this U-Net has.
    others = [p.path for p in ldm_parts(unet) if p.path in modules and p.role == "other"]
    assert others == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out"]
    assert [p.path for p in ldm_parts(unet) if p.role != "other"] == parts


def test_other_layout_numbering():
    unet = LAYOUTS["other"]()
    assert [b.name for b in ldm_blocks(unet)][-1] == "OUT08"  # up blocks: (2, 3, 1) layers + 1 each
    assert layer_names(unet, "down", 1) == ("IN03", "IN04", "IN05")
    assert rows([ldm_block(unet, "MID")]) == [
        ("MID", "middle_block", "mid", None, None, [("resnet", "mid_block.resnets.0", "middle_block.0")])]
    # Up block 0 has attention: its upsampler follows the attention.
    assert ldm_block(unet, "OUT02").sampler.ldm_path == "output_blocks.2.2"
    assert list(cross_attention_modules(unet)) == ["IN03", "IN04", "IN05", "IN07", "IN08",
                                                   "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06"]


def test_controlnet_has_the_encoder_half():
    with torch.device("meta"):
        controlnet = ControlNetModel(cross_attention_dim=768)
    names = [b.name for b in ldm_blocks(controlnet)]
    assert names == [f"IN{n:02d}" for n in range(12)] + ["MID"]
    assert ldm_blocks(controlnet) == ldm_blocks(sd15())[:13]


def test_invalid_configs():
    config = dict(sd15().config)
    with pytest.raises(ValueError, match="4 down blocks but 3 up blocks"):
        ldm_blocks({**config, "up_block_types": config["up_block_types"][:3]})
    with pytest.raises(ValueError, match="layers_per_block has 2 entries for 4 blocks"):
        ldm_blocks({**config, "layers_per_block": (2, 2)})
    assert has_block_layout(config) and has_block_layout(sd15()) and not has_block_layout(torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="has no diffusers config"):
        ldm_blocks(torch.nn.Linear(1, 1))
