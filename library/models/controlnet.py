"""Loading ControlNet 1.0-style models (SD 1.x / 2.x) for a loaded U-Net: `load_controlnet`.

Three forms are accepted, all returning a diffusers `ControlNetModel`:

* a single file (`.safetensors`, or a `.ckpt`/`.pt`/`.pth` read with the safe reader of
  `library.models.checkpoint`) in the original layout, keys `control_model.*` or the same
  keys without that prefix (whole SD checkpoints that also carry `control_model.*` work too,
  only the ControlNet part is read);
* a "difference" file of the same layout with a `difference` key, whose weights shared with
  the SD U-Net are stored as (ControlNet - base U-Net); the given U-Net's weights are added
  back;
* a Diffusers ControlNet folder (`config.json` + weights), via `from_pretrained`.

A single file carries no config. A ControlNet is a copy of its U-Net's encoder half, so the
network is built with diffusers' `ControlNetModel.from_unet` from the loaded U-Net's config;
only the hint encoder's widths (`conditioning_embedding_out_channels`) and input channels
are the file's own, and they are read from the `input_hint_block` conv shapes here. The
U-Net-like part and the zero convs are renamed with diffusers'
`convert_controlnet_checkpoint`; the hint encoder is renamed by this module (diffusers'
converter assumes exactly four hint widths). Every tensor's shape is compared with the
built network before loading, so a ControlNet made for another model family ends in one
clear `UserError` instead of a shape-mismatch traceback.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.models.attention import set_attention
from library.errors import UserError, first_line
from library.models import checkpoint
from library.models.loader import _assign, _empty_modules, _move

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

logger = logging.getLogger(__name__)

OPTION = "--control_net_models"
LDM_PREFIX = "control_model."
DIFFERENCE_KEY = "difference"
_HINT = "input_hint_block."
_HINT_DIFFUSERS = "controlnet_cond_embedding."
#: Known cross-attention widths -> the model family that has them (for error messages).
_FAMILY_BY_WIDTH = {768: "SD 1.x models", 1024: "SD 2.x models"}


def load_controlnet(
    spec: str,
    unet: UNet2DConditionModel,
    dtype: torch.dtype,
    device: torch.device | str,
) -> ControlNetModel:
    """Load the ControlNet that `spec` names for `unet` (the loaded SD U-Net).

    `spec` is a file, a Diffusers ControlNet folder, a glob matching one of them, or a
    Hugging Face ID in the local cache. The result is in eval mode without gradients, on
    `device` in `dtype`. A file that is no ControlNet, or one made for a model of another
    shape (say an SD 2.x ControlNet with an SD 1.x U-Net), raises a one-line `UserError`.
    """
    path = checkpoint.resolve_model_path(spec, OPTION)
    if path.is_dir():
        controlnet = _load_folder(path, unet, dtype)
    else:
        controlnet = _load_single_file(path, unet, dtype)
    logger.debug("ControlNet from %s", path.name)
    controlnet = _move(controlnet, torch.device(device)).eval().requires_grad_(False)
    set_attention(controlnet, "auto")  # the U-Net's choice, made the same way (library.models.attention)
    return controlnet


# --- single files -------------------------------------------------------------------------


def _load_single_file(path: Path, unet: UNet2DConditionModel, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet from one file in the ControlNet 1.0 layout (full or difference)."""
    raw = checkpoint.read_state_dict(path)
    ldm = _controlnet_keys(raw)
    # Weights kept as stored are mapped in the background while the network is built (loader.load_model);
    # pages of weights cast to another dtype are dropped as they are copied.
    with checkpoint.paging_in(t for t in ldm.values() if t.dtype == dtype):
        return _build(path, ldm, DIFFERENCE_KEY in raw, unet, dtype, checkpoint.FilePages(path))


def _build(path: Path, ldm: Mapping[str, torch.Tensor], is_difference: bool, unet: UNet2DConditionModel,
           dtype: torch.dtype, pages: checkpoint.FilePages | None = None) -> ControlNetModel:
    """The ControlNet of a file's prefix-less ControlNet 1.0 tensors `ldm`."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    hint = {key: tensor for key, tensor in ldm.items() if key.startswith(_HINT)}
    if not hint:
        raise UserError(
            f"{OPTION} {path}: not a ControlNet model (no input_hint_block weights); "
            "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
        )
    hint_sd, hint_channels, conditioning_channels = _convert_hint_block(hint, path)

    with _empty_modules():
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=hint_channels,
            conditioning_channels=conditioning_channels,
            load_weights_from_unet=False,
        )
    rest = {key: tensor for key, tensor in ldm.items() if not key.startswith(_HINT)}
    converted = convert_controlnet_checkpoint(rest, dict(controlnet.config))
    # The converter looks zero convs up with .get(): absent ones come back as None.
    state = {key: tensor for key, tensor in converted.items() if tensor is not None}
    state.update(hint_sd)
    state = _fit_to_model(state, controlnet, unet, path)

    if is_difference:
        logger.info("%s is a difference ControlNet: adding the model's U-Net weights to it", path.name)
        state = _add_unet_weights(state, unet)
    _assign(controlnet, state, dtype, f"{OPTION} {path}: ControlNet", pages)
    return controlnet


def _controlnet_keys(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet tensors of a file, without the `control_model.` prefix.

    Files store them with the prefix (alone, or beside a whole SD model) or without it.
    """
    prefixed = {key[len(LDM_PREFIX) :]: t for key, t in raw.items() if key.startswith(LDM_PREFIX)}
    if prefixed:
        return prefixed
    return {key: tensor for key, tensor in raw.items() if key != DIFFERENCE_KEY}


def _convert_hint_block(
    hint: Mapping[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], tuple[int, ...], int]:
    """Rename the hint encoder to Diffusers keys and read its widths from the conv shapes.

    LDM's `input_hint_block` is one `nn.Sequential` of convs with a SiLU after each but the
    last: the first conv maps the hint image to the first width, then each width has a conv
    that keeps it and, but for the last width, a stride-2 conv to the next one; the last
    conv maps to the U-Net's first block width. Diffusers names these `conv_in`,
    `blocks.0..` and `conv_out`. Returns the renamed tensors, the widths (diffusers'
    `conditioning_embedding_out_channels`) and the hint image's channel count.
    """
    indices = sorted({int(key[len(_HINT) :].split(".", 1)[0]) for key in hint})
    convs = [hint.get(f"{_HINT}{index}.weight") for index in indices]
    if len(indices) < 2 or len(indices) % 2 or any(w is None or w.ndim != 4 for w in convs):
        raise UserError(
            f"{OPTION} {path}: the ControlNet's input_hint_block has an unexpected layout "
            f"(layers {', '.join(map(str, indices))}); pass a ControlNet 1.0 model"
        )
    names = ["conv_in", *(f"blocks.{i}" for i in range(len(indices) - 2)), "conv_out"]
    renamed: dict[str, torch.Tensor] = {}
    for index, name in zip(indices, names):
        for param in ("weight", "bias"):
            tensor = hint.get(f"{_HINT}{index}.{param}")
            if tensor is not None:
                renamed[f"{_HINT_DIFFUSERS}{name}.{param}"] = tensor
    # conv_in's output, then the output of every second block (the stride-2 ones).
    widths = (int(convs[0].shape[0]), *(int(w.shape[0]) for w in convs[2:-1:2]))
    return renamed, widths, int(convs[0].shape[1])


def _fit_to_model(
    state: dict[str, torch.Tensor],
    controlnet: ControlNetModel,
    unet: UNet2DConditionModel,
    path: Path,
) -> dict[str, torch.Tensor]:
    """Check every tensor's shape against the built network; raise one line if one differs.

    Attention `proj_in`/`proj_out` weights are stored as 1x1 convs or as linear weights
    depending on the model (SD 2.x uses linear projections); the other form is reshaped.
    """
    expected = controlnet.state_dict()
    width = unet.config.cross_attention_dim
    for key, tensor in state.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2 and tensor.shape[1] != width:
            raise UserError(
                f"{OPTION} {path}: this ControlNet does not fit the model (cross-attention width "
                f"{tensor.shape[1]}, the model's is {width}); use a ControlNet made for {_family(width)}"
            )
    base = unet.config.block_out_channels[0]
    conv_in = state.get("conv_in.weight")
    if conv_in is not None and conv_in.shape[0] != base:
        raise UserError(
            f"{OPTION} {path}: this ControlNet does not fit the model (base channel width "
            f"{conv_in.shape[0]}, the model's is {base}); use a ControlNet made for {_family(width)}"
        )
    fitted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = expected.get(key)
        if target is not None and tensor.shape != target.shape:
            if tensor.numel() == target.numel() and key.endswith(("proj_in.weight", "proj_out.weight")):
                tensor = tensor.reshape(target.shape)
            else:
                raise UserError(
                    f"{OPTION} {path}: this ControlNet does not fit the model ({key} has shape "
                    f"{tuple(tensor.shape)}, the model's is {tuple(target.shape)}); "
                    f"use a ControlNet made for {_family(width)}"
                )
        fitted[key] = tensor
    return fitted


def _family(width: int) -> str:
    """The models a cross-attention width belongs to, in words."""
    return _FAMILY_BY_WIDTH.get(width, f"models of cross-attention width {width}")


def _add_unet_weights(state: dict[str, torch.Tensor], unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Undo a difference ControlNet: add the U-Net's weight to every tensor the two share.

    ControlNet and U-Net use the same Diffusers names for the shared part (conv_in,
    time_embedding, down_blocks, mid_block). The sum is taken in fp32 on the CPU.
    """
    unet_sd = unet.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        base = unet_sd.get(key)
        if base is not None and tensor.is_floating_point():
            tensor = tensor.float() + base.detach().to("cpu", torch.float32)
        out[key] = tensor
    return out


# --- Diffusers folders --------------------------------------------------------------------


def _load_folder(path: Path, unet: UNet2DConditionModel, dtype: torch.dtype) -> ControlNetModel:
    """A Diffusers ControlNet folder, after checking its config against the U-Net's."""
    import json

    from diffusers import ControlNetModel

    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{OPTION} {path}: folder has no config.json; not a Diffusers ControlNet, "
            "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise UserError(
            f"{OPTION} {path}: the folder holds a {config['_class_name']}, not a ControlNetModel; "
            "pass a ControlNet 1.0 .safetensors or a Diffusers ControlNet folder"
        )
    width = unet.config.cross_attention_dim
    for name, what in (("cross_attention_dim", "cross-attention width"), ("block_out_channels", "block widths")):
        theirs, ours = config.get(name), unet.config[name]
        if theirs is not None and _as_tuple(theirs) != _as_tuple(ours):
            raise UserError(
                f"{OPTION} {path}: this ControlNet does not fit the model ({what} {_show(theirs)}, "
                f"the model's is {_show(ours)}); use a ControlNet made for {_family(width)}"
            )
    try:
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{OPTION} {checkpoint.pickle_refusal(path, exc)}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{OPTION} {path}: cannot load the Diffusers ControlNet ({first_line(exc)})") from None


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _show(value: object) -> str:
    """A config value for a message: 768, or (320, 640, 1280, 1280)."""
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
