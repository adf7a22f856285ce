"""Write Diffusers-layout state dicts back in the original LDM (CompVis) single-file layout.

Diffusers converts single-file SD 1.x / 2.x checkpoints *to* its own layout
(`diffusers.loaders.single_file_utils.convert_ldm_*`) but not back. This module is the
reverse, as pure functions over state dicts: no model is loaded or built, tensors are not
copied where a rename suffices (the returned dicts share storage with their inputs), and
every input key must be accounted for, so a weight is never silently dropped.

It is used by `library/models/tiny_files.py` (tiny test models in the exact key layout of real
SD checkpoints) and `tools/convert_model.py` (Diffusers folder -> single file). The layouts
are verified by round-tripping through diffusers' forward converters in
`tests/models/test_ldm_export.py`.

Layout summary (LDM names on the right):

* U-Net, prefix ``model.diffusion_model.``: ``input_blocks.*`` / ``middle_block.*`` /
  ``output_blocks.*`` as numbered by `library.models.unet_blocks` (``conv_in`` ->
  ``input_blocks.0.0``, downsampler convs at ``input_blocks.N.0.op``, upsamplers at
  ``output_blocks.N.1/2.conv``); ``time_embedding.linear_1/2`` -> ``time_embed.0/2``;
  ``conv_norm_out`` / ``conv_out`` -> ``out.0`` / ``out.2``.
* VAE, prefix ``first_stage_model.``: ``down_blocks.i.resnets.j`` -> ``down.i.block.j``,
  decoder up blocks in *reversed* order (``up_blocks.0`` -> ``up.{n-1}``), mid resnets ->
  ``mid.block_1/2``, mid attention -> ``mid.attn_1`` with 1x1-conv q/k/v/proj_out weights.
* ControlNet 1.0, prefix ``control_model.``: the U-Net's encoder half under the U-Net's
  LDM names, plus ``input_hint_block.*`` and ``zero_convs.*`` / ``middle_block_out.0``
  (see `controlnet_to_ldm`).
* SD1 text encoder: ``cond_stage_model.transformer.`` + HF CLIPTextModel keys, which always
  carry ``text_model.`` in the file (transformers >= 5.6 no longer has that wrapper).
* SD2 text encoder: ``cond_stage_model.model.`` + OpenCLIP names, q/k/v fused into
  ``attn.in_proj_*``, ``text_projection`` stored as ``[width, proj_dim]``, plus ``logit_scale``.
* SDXL (Stability AI's layout): CLIP ViT-L as in SD1 under
  ``conditioner.embedders.0.transformer.``, OpenCLIP ViT-bigG as in SD2 (every block, its
  real projection) under ``conditioner.embedders.1.model.``; the U-Net's added-conditioning
  MLP at ``label_emb.0.0`` / ``label_emb.0.2``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from library.errors import UserError
from library.models.unet_blocks import ldm_parts

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
V_PRED_KEY = "v_pred"
CHECKPOINT_KINDS: tuple[str, ...] = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-v")

# OpenCLIP's learned temperature saturates at its clamp of 100; real SD2 files store ln(100).
_OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # Names of diffusers' deprecated attention block, still found in old Diffusers folders.
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TEXT_PREFIX = "text_model."
_HF_PROJECTION_KEY = "text_projection.weight"
_HF_POSITION_IDS_KEY = "text_model.embeddings.position_ids"


class _Target(NamedTuple):
    """Where one Diffusers module goes: its LDM prefix and how its sub-modules are renamed."""

    prefix: str
    renames: Mapping[str, str] = {}
    linear_to_conv: bool = False  # store 2-D Linear weights as [out, in, 1, 1] 1x1 convs


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, _Target], what: str) -> dict[str, Tensor]:
    """Rename every key of `sd` by the longest matching prefix in `table`.

    Table keys are Diffusers module prefixes ending in "."; the rest of a key is the
    sub-module path plus the parameter name, whose sub-module path may be renamed by the
    target's `renames`. Keys with no matching prefix raise, naming up to five of them.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = table.get(".".join(parts[:cut]) + ".")
            if target is not None:
                break
        else:
            unknown.append(key)
            continue
        module, param = ".".join(parts[cut:-1]), parts[-1]
        module = target.renames.get(module, module)
        new_key = target.prefix + (f"{module}.{param}" if module else param)
        if target.linear_to_conv and param == "weight" and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[new_key] = tensor
    if unknown:
        raise UserError(
            f"cannot write the {what} in the SD single-file layout: {len(unknown)} unexpected "
            f"weight(s) such as {', '.join(sorted(unknown)[:5])}; only SD 1.x / 2.x models "
            "are supported"
        )
    return out


def _unet_table(config: Mapping[str, Any]) -> dict[str, _Target]:
    """Map each Diffusers module prefix of a U-Net (or of a ControlNet's U-Net-like half) to
    its LDM prefix, from the project's one table of the U-Net's LDM blocks.

    The table is computed from `config` (block types, layers per block), so any size works;
    a ControlNet config has no up blocks, so it gets exactly the encoder half.
    """
    return {f"{part.path}.": _Target(f"{part.ldm_path}.", part.renames) for part in ldm_parts(config)}


def unet_to_ldm(unet_sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename a Diffusers `UNet2DConditionModel` state dict to LDM keys ("model.diffusion_model.").

    `config` is the U-Net's config (a `FrozenDict` or plain dict); its `down_block_types`,
    `up_block_types` and `layers_per_block` fix the block numbering, so any size works.
    Transformer (attention) sub-module names are the same in both layouts.
    """
    renamed = _rename(unet_sd, _unet_table(config), "U-Net")
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def controlnet_to_ldm(controlnet_sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename a Diffusers `ControlNetModel` state dict to ControlNet 1.0 keys ("control_model.").

    `config` is the ControlNet's config. The U-Net-like half (time embedding, conv_in, down
    and mid blocks) has the U-Net's names in both layouts (`input_blocks.*`, `middle_block.*`,
    `time_embed.*`). The rest is ControlNet's own: the hint encoder's convolutions, which
    LDM keeps in one `nn.Sequential` with a SiLU after each conv (so convs sit at even
    indices: `conv_in` at 0, `blocks.i` at 2(i+1), `conv_out` after the last block), and the
    zero convolutions, `controlnet_down_blocks.i` -> `zero_convs.i.0` and
    `controlnet_mid_block` -> `middle_block_out.0`.
    """
    table = _unet_table(config)
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    table["controlnet_cond_embedding.conv_in."] = _Target("input_hint_block.0.")
    for block in range(hint_blocks):
        table[f"controlnet_cond_embedding.blocks.{block}."] = _Target(f"input_hint_block.{2 * (block + 1)}.")
    table["controlnet_cond_embedding.conv_out."] = _Target(f"input_hint_block.{2 * (hint_blocks + 1)}.")
    for index in range(_child_count(list(controlnet_sd), "controlnet_down_blocks.")):
        table[f"controlnet_down_blocks.{index}."] = _Target(f"zero_convs.{index}.0.")
    table["controlnet_mid_block."] = _Target("middle_block_out.0.")
    renamed = _rename(controlnet_sd, table, "ControlNet")
    return {CONTROLNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def _child_count(keys: Sequence[str], prefix: str) -> int:
    """How many numbered children ("prefix0.", "prefix1.", ...) the keys have under `prefix`."""
    indices = {int(key[len(prefix) :].split(".", 1)[0]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _vae_table(keys: Sequence[str]) -> dict[str, _Target]:
    """Map each Diffusers `AutoencoderKL` module prefix to its LDM prefix (counts from `keys`)."""
    table = {
        name: _Target(name)
        for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.")
    }
    table["quant_conv."] = _Target("quant_conv.")
    table["post_quant_conv."] = _Target("post_quant_conv.")
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_norm_out."] = _Target(f"{part}.norm_out.")
        for layer in range(2):
            resnet = _Target(f"{part}.mid.block_{layer + 1}.", _VAE_RESNET_RENAMES)
            table[f"{part}.mid_block.resnets.{layer}."] = resnet
        attention = _Target(f"{part}.mid.attn_1.", _VAE_ATTENTION_RENAMES, linear_to_conv=True)
        table[f"{part}.mid_block.attentions.0."] = attention

    for block in range(_child_count(keys, "encoder.down_blocks.")):
        src = f"encoder.down_blocks.{block}."
        for layer in range(_child_count(keys, src + "resnets.")):
            resnet = _Target(f"encoder.down.{block}.block.{layer}.", _VAE_RESNET_RENAMES)
            table[f"{src}resnets.{layer}."] = resnet
        table[src + "downsamplers.0."] = _Target(f"encoder.down.{block}.downsample.")

    up_blocks = _child_count(keys, "decoder.up_blocks.")
    for block in range(up_blocks):
        src, dst = f"decoder.up_blocks.{block}.", f"decoder.up.{up_blocks - 1 - block}."
        for layer in range(_child_count(keys, src + "resnets.")):
            table[f"{src}resnets.{layer}."] = _Target(f"{dst}block.{layer}.", _VAE_RESNET_RENAMES)
        table[src + "upsamplers.0."] = _Target(dst + "upsample.")
    return table


def vae_to_ldm(vae_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Diffusers `AutoencoderKL` state dict to LDM keys ("first_stage_model.").

    Block and layer counts are read from the keys. The decoder's up blocks are numbered in
    reverse (Diffusers' first up block, at the lowest resolution, is LDM's `up.{n-1}`), and
    the mid-block attention's Linear q/k/v/out weights become 1x1 conv weights.
    """
    renamed = _rename(vae_sd, _vae_table(list(vae_sd)), "VAE")
    return {VAE_PREFIX + key: tensor for key, tensor in renamed.items()}


def _hf_text_keys(te_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Give a CLIP text-model state dict the `text_model.` prefix that single files use.

    transformers >= 5.6 flattened `CLIPTextModel` (keys start at `embeddings.`), older
    versions and `CLIPTextModelWithProjection` keep the `text_model.` wrapper; the
    projection of the latter (`text_projection.weight`) is kept as is.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in te_sd.items():
        if key == _HF_PROJECTION_KEY or key.startswith(_HF_TEXT_PREFIX):
            out[key] = tensor
        else:
            out[_HF_TEXT_PREFIX + key] = tensor
    return out


def clip_to_ldm(te_sd: Mapping[str, Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """Write an SD1 (CLIP ViT-L) text encoder as "cond_stage_model.transformer.text_model.*".

    The HF key names are kept (SD1 files embed a HF `CLIPTextModel`). A projection weight,
    present when given a `CLIPTextModelWithProjection`, has no place in SD1 files and is
    left out; a `position_ids` buffer is written only if the state dict has one.
    """
    keys = _hf_text_keys(te_sd)
    if keys.pop(_HF_PROJECTION_KEY, None) is not None:
        logger.info("SD1 checkpoints carry no text projection; leaving text_projection.weight out")
    return {prefix + key: tensor for key, tensor in keys.items()}


def open_clip_to_ldm(te_sd: Mapping[str, Tensor], projection: Tensor | None = None,
                     prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """Write an SD2 text encoder (HF CLIP keys) in OpenCLIP layout: "cond_stage_model.model.*".

    Every encoder layer given is written: Diffusers' SD2 text encoder has 23 layers where
    the original files have 24 (SD2 reads the penultimate layer, so the 24th is unused).
    q/k/v projections are fused into `attn.in_proj_weight/bias` in q, k, v order.

    `projection` is the text projection as a Linear weight `[proj_dim, width]`; without it
    the state dict's `text_projection.weight` is used, else an identity `[width, width]`
    (SD never uses the projection, but OpenCLIP files have one and loaders read its first
    dimension as the model width). It is stored transposed, `[width, proj_dim]`, as OpenCLIP
    does. `logit_scale` is added with OpenCLIP's trained value ln(100).
    """
    sd = _hf_text_keys(te_sd)
    sd.pop(_HF_POSITION_IDS_KEY, None)  # OpenCLIP has no position-ids buffer
    stored_projection = sd.pop(_HF_PROJECTION_KEY, None)
    if projection is None:
        projection = stored_projection

    out: dict[str, Tensor] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_prefix = "text_model.encoder.layers."
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}  # (layer, "weight"|"bias") -> {q|k|v: tensor}
    unknown: list[str] = []
    for key, tensor in sd.items():
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        if not key.startswith(layer_prefix):
            unknown.append(key)
            continue
        index, rest = key[len(layer_prefix) :].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(index), param), {})[module[len("self_attn.")]] = tensor
        elif module in _OPEN_CLIP_LAYER_RENAMES:
            out[f"transformer.resblocks.{index}.{_OPEN_CLIP_LAYER_RENAMES[module]}.{param}"] = tensor
        else:
            unknown.append(key)
    for (index, param), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            unknown.extend(f"{layer_prefix}{index}.self_attn.{p}_proj.{param}" for p in parts)
            continue
        fused = torch.cat([parts["q"], parts["k"], parts["v"]])  # dim 0: q rows, then k, then v
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = fused
    if unknown:
        raise UserError(
            f"cannot write the text encoder in the SD2 (OpenCLIP) layout: {len(unknown)} unexpected "
            f"or incomplete weight(s) such as {', '.join(sorted(unknown)[:5])}"
        )
    if "token_embedding.weight" not in out:
        raise UserError("cannot write the SD2 text encoder: it has no token embedding")

    embedding = out["token_embedding.weight"]
    if projection is None:
        width = embedding.shape[1]
        projection = torch.eye(width, dtype=embedding.dtype, device=embedding.device)
    out["text_projection"] = projection.T.contiguous()
    out["logit_scale"] = torch.tensor(_OPEN_CLIP_LOGIT_SCALE, dtype=embedding.dtype, device=embedding.device)
    return {prefix + key: tensor for key, tensor in out.items()}


def to_ldm_checkpoint(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    te_sd: Mapping[str, Tensor],
    unet_config: Mapping[str, Any],
    kind: str,
    te2_sd: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Assemble a whole single-file SD checkpoint from Diffusers state dicts.

    `kind` is "sd1" (CLIP text encoder), "sd2" (OpenCLIP text encoder), "sdxl" (CLIP ViT-L
    `te_sd` plus OpenCLIP bigG `te2_sd`, a `CLIPTextModelWithProjection`'s) or "sd2-v" /
    "sdxl-v" (with v-prediction). The weights of a v-prediction model cannot say so, so
    those add the marker key `v_pred`, a 0-dim tensor holding 1, as kohya's tools do.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
    if kind.startswith("sdxl"):
        if te2_sd is None:
            raise ValueError("an SDXL checkpoint needs the second text encoder's state dict")
        text = {**clip_to_ldm(te_sd, SDXL_CLIP_PREFIX), **open_clip_to_ldm(te2_sd, prefix=SDXL_OPEN_CLIP_PREFIX)}
    else:
        text = clip_to_ldm(te_sd) if kind == "sd1" else open_clip_to_ldm(te_sd)
    checkpoint = {**unet_to_ldm(unet_sd, unet_config), **vae_to_ldm(vae_sd), **text}
    if kind.endswith("-v"):
        checkpoint[V_PRED_KEY] = torch.tensor(1)
    logger.debug("built a %s single-file checkpoint with %d tensors", kind, len(checkpoint))
    return checkpoint
