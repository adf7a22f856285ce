"""What a checkpoint is, read from its tensor names and shapes alone.

One pure function, `detect_model`, maps `{key: shape}` of an original-layout (LDM)
checkpoint to a `ModelSpec`: the family (SD 1.x, SD 2.x or SDXL) and the full Diffusers /
transformers configs of its U-Net, VAE and text encoder(s). Every size (channels, levels,
blocks per level, attention placement, transformer depth, linear vs conv projections,
cross-attention width, text encoder depth/width, VAE size) comes from shapes, so a tiny
test model and a 2 GB checkpoint load through the same code. Written by hand: no library
infers configs from shapes for arbitrary sizes.

What shapes cannot tell is fixed by family, as in the released models:
- SD1: CLIP ViT-L text encoder (`quick_gelu`), U-Net attention with 8 heads.
- SD2: OpenCLIP ViT-H text encoder (`gelu`), U-Net attention with 64-wide heads; the last
  text-encoder block is not used (SD2 conditions on the penultimate layer), as in the
  original tool, which is why `--clip_skip` counts from the 23rd of 24 blocks there.
- SDXL (Stability AI's layout: text encoders under `conditioner.embedders.0.transformer.`
  (HF CLIP ViT-L keys) and `conditioner.embedders.1.model.` (OpenCLIP ViT-bigG keys), the
  U-Net's added-conditioning MLP at `label_emb.0.*`): CLIP ViT-L (`quick_gelu`) plus
  OpenCLIP bigG (`gelu`, every block used, text projection kept for the pooled vector),
  U-Net attention with 64-wide heads, VAE scaling factor 0.13025. The width of the
  sinusoid of each added size number is (label_emb input width - pooled width) / 6.
- Text encoders: 64-wide attention heads. GroupNorm: 32 groups.

The family is read from the weights, never from the file size.

`normalize_keys` first gives every tensor its canonical prefix, so files whose keys lack
`model.diffusion_model.` / `first_stage_model.` / `cond_stage_model.` load too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

Family = Literal["sd1", "sd2", "sdxl"]
Shape = Sequence[int]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
SDXL_PREFIX = "conditioner.embedders."
#: VAE scaling factors: SD 1.x / 2.x, and SDXL's VAE.
SD_VAE_SCALE = 0.18215
SDXL_VAE_SCALE = 0.13025
#: Sinusoid width per added size number when a file has no bigG text encoder to tell it.
SDXL_TIME_EMBED_DIM = 256

# Marker key (without prefix) -> canonical prefix, and the names a component's keys
# start with below its prefix (so prefix-less files are split between components).
_COMPONENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("input_blocks.0.0.weight", UNET_PREFIX,
     ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")),
    ("encoder.conv_in.weight", VAE_PREFIX,
     ("encoder.conv_in.", "encoder.down.", "encoder.mid.", "encoder.norm_out.",
      "encoder.conv_out.", "decoder.", "quant_conv.", "post_quant_conv.")),
    ("embeddings.token_embedding.weight", SD1_TE_PREFIX,
     ("embeddings.", "encoder.layers.", "final_layer_norm.")),
    ("transformer.resblocks.0.ln_1.weight", SD2_TE_PREFIX,
     ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.",
      "text_projection", "logit_scale")),
)


class DetectionError(ValueError):
    """The tensors do not form a Stable Diffusion 1.x/2.x/XL checkpoint; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint's family and the configs to build its networks (plain dicts);
    `text_encoder_2` (bigG) is SDXL's only."""

    family: Family
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    text_encoder_2: dict | None = None


def normalize_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map each key to its canonical LDM name (`old -> new`); keys of no component are dropped.

    The prefix in front of a component's marker key (e.g. `""` or `"diffusion_model."`
    before `input_blocks.0.0.weight`) is found once and replaced by the canonical one.
    Old `transformers` layouts without `text_model.` are moved below it. SDXL's text
    encoders (`conditioner.embedders.*`) keep their names.
    """
    mapping: dict[str, str] = {k: k for k in keys if k.startswith(SDXL_PREFIX)}
    keys = [k for k in keys if k not in mapping]
    for marker, canonical, roots in _COMPONENTS:
        found = [k[: -len(marker)] for k in keys if k.endswith(marker)]
        if not found:
            continue
        prefix = min(found, key=len)
        for k in keys:
            rest = k[len(prefix):]
            if k.startswith(prefix) and rest.startswith(roots) and k not in mapping:
                mapping[k] = canonical + rest
    return mapping


def detect_model(shapes: Mapping[str, Shape]) -> ModelSpec:
    """Infer family and configs from canonical (normalized) key names and shapes."""
    family = detect_family(shapes)
    if family != "sdxl":
        return ModelSpec(
            family=family,
            unet=infer_unet_config(_strip(shapes, UNET_PREFIX), family),
            vae=infer_vae_config(_strip(shapes, VAE_PREFIX)),
            text_encoder=infer_text_config(shapes, family),
        )
    te2 = infer_text_config(shapes, "sdxl-2")
    unet = infer_unet_config(_strip(shapes, UNET_PREFIX), family, pooled_width=te2["projection_dim"])
    return ModelSpec(
        family=family,
        unet=unet,
        vae=dict(infer_vae_config(_strip(shapes, VAE_PREFIX)), scaling_factor=SDXL_VAE_SCALE),
        text_encoder=infer_text_config(shapes, "sdxl"),
        text_encoder_2=te2,
    )


def detect_family(shapes: Mapping[str, Shape]) -> Family:
    """SDXL if it has SDXL's text encoders or added-conditioning MLP; SD2 if the text encoder
    has the OpenCLIP layout, SD1 if CLIP's; else from the U-Net."""
    if any(k.startswith(SDXL_PREFIX) for k in shapes) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    if any(k.startswith(SD2_TE_PREFIX + "transformer.resblocks.") for k in shapes):
        return "sd2"
    if any(k.startswith(SD1_TE_PREFIX) for k in shapes):
        return "sd1"
    proj = shapes.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if proj is not None:  # no text encoder in the file: SD2 U-Nets use linear projections
        return "sd2" if len(proj) == 2 else "sd1"
    raise DetectionError("no text encoder and no U-Net attention weights found")


def _strip(shapes: Mapping[str, Shape], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(u: Mapping[str, tuple[int, ...]], family: Family, pooled_width: int | None = None) -> dict:
    """UNet2DConditionModel kwargs from LDM U-Net keys (prefix removed).

    SDXL's added-conditioning MLP (`label_emb.0.*`) takes the pooled text vector
    (`pooled_width` wide, bigG's projection) and six sinusoid-embedded size numbers.
    """
    if "input_blocks.0.0.weight" not in u:
        raise DetectionError("no U-Net weights (model.diffusion_model.input_blocks.*)")
    blocks = _indices(u, r"input_blocks\.(\d+)\.")
    # Levels are separated by downsampling blocks (`input_blocks.N.0.op`).
    levels: list[list[int]] = [[]]
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in u:
            levels.append([])
        else:
            levels[-1].append(n)
    layers = len(levels[0])
    if layers == 0 or any(len(level) != layers for level in levels):
        raise DetectionError("U-Net levels have different numbers of blocks")
    channels = [u[f"input_blocks.{level[0]}.0.out_layers.3.weight"][0] for level in levels]
    has_attn = [f"input_blocks.{level[0]}.1.proj_in.weight" in u for level in levels]
    depths = [
        len(_indices(u, rf"input_blocks\.{level[0]}\.1\.transformer_blocks\.(\d+)\.")) or 1
        for level in levels
    ]
    attn_key = next((k for k in u if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise DetectionError("U-Net has no cross-attention layers")
    proj_in = next(u[k] for k in u if k.endswith(".proj_in.weight"))
    heads = [max(1, c // 64) for c in channels] if family != "sd1" else 8
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    config = dict(
        sample_size={"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        in_channels=u["input_blocks.0.0.weight"][1],
        out_channels=u["out.2.weight"][0],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else tuple(depths),
        cross_attention_dim=u[attn_key][1],
        attention_head_dim=tuple(heads) if isinstance(heads, list) else heads,
        use_linear_projection=len(proj_in) == 2,
        norm_num_groups=32,
    )
    if family == "sdxl":
        config.update(_added_conditioning(u, pooled_width))
    return config


def _added_conditioning(u: Mapping[str, tuple[int, ...]], pooled_width: int | None) -> dict:
    """SDXL's `text_time` added-conditioning config from `label_emb.0.0.weight` [out, in]."""
    if "label_emb.0.0.weight" not in u:
        raise DetectionError("SDXL U-Net without its added-conditioning weights (label_emb.0.*)")
    width = u["label_emb.0.0.weight"][1]
    time_dim = SDXL_TIME_EMBED_DIM if pooled_width is None else (width - pooled_width) // 6
    if time_dim <= 0 or (pooled_width is not None and pooled_width + 6 * time_dim != width):
        raise DetectionError(f"SDXL added conditioning of width {width} does not fit a pooled vector of {pooled_width}")
    return dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width,
    )


def infer_vae_config(v: Mapping[str, tuple[int, ...]]) -> dict:
    """AutoencoderKL kwargs from LDM VAE keys (prefix removed)."""
    if "encoder.conv_in.weight" not in v or "decoder.conv_in.weight" not in v:
        raise DetectionError("no VAE weights (first_stage_model.encoder/decoder.*)")
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    channels = [v[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    layers = len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\."))
    n = len(levels)
    return dict(
        in_channels=v["encoder.conv_in.weight"][1],
        out_channels=v["decoder.conv_out.weight"][0],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        latent_channels=v["decoder.conv_in.weight"][1],
        norm_num_groups=32,
        sample_size=8 * 2 ** (n - 1) * 8,
        scaling_factor=SD_VAE_SCALE,
    )


def infer_text_config(shapes: Mapping[str, Shape], family: Family | Literal["sdxl-2"]) -> dict:
    """CLIPTextConfig kwargs for the text encoder (SD2's OpenCLIP layout included).

    `family` "sdxl" is SDXL's CLIP ViT-L, "sdxl-2" its OpenCLIP bigG (all blocks kept).
    """
    if family in ("sd1", "sdxl"):
        prefix = SD1_TE_PREFIX if family == "sd1" else SDXL_TE1_PREFIX
        t = _strip(shapes, prefix)
        if "embeddings.token_embedding.weight" not in t:
            raise DetectionError(f"no text encoder weights ({prefix}*)")
        vocab, width = t["embeddings.token_embedding.weight"]
        layers = len(_indices(t, r"encoder\.layers\.(\d+)\."))
        inner = t["encoder.layers.0.mlp.fc1.weight"][0]
        positions = t["embeddings.position_embedding.weight"][0]
        act, projection = "quick_gelu", width
    else:
        prefix = SD2_TE_PREFIX if family == "sd2" else SDXL_TE2_PREFIX
        t = _strip(shapes, prefix)
        if "token_embedding.weight" not in t:
            raise DetectionError(f"no text encoder weights ({prefix}*)")
        vocab, width = t["token_embedding.weight"]
        # SD2 drops the last block (it conditions on the penultimate layer); SDXL's pooled
        # vector needs bigG's last layer, so every block is kept there.
        layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\.")) - (1 if family == "sd2" else 0)
        inner = t["transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = t["positional_embedding"][0]
        act = "gelu"
        projection = t.get("text_projection", (width, width))[1]
    if layers < 1:
        raise DetectionError("text encoder has too few layers")
    return dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
