"""What a model's file header tells before the model loads: the U-Net's levels, the VAE's
scale and the text encoder's layers.

A `.safetensors` checkpoint's header lists every tensor's name and shape (read with
`safe_open`, no tensor data); a Diffusers folder has them in its `config.json` files. Pickled
checkpoints (`.ckpt`) tell nothing without being read whole: they give None, and the checks
run after the load as before. `library.cli.preflight.check_model_header` uses this to refuse
`--W/--H` below the U-Net's smallest size, a `--clip_skip` past the text encoder's layers and a
Deep Shrink depth the U-Net does not have, before any model file opens for loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """The parts of a checkpoint's architecture the command line's values depend on."""

    down_blocks: int  # the U-Net's levels (diffusers `down_blocks`): Deep Shrink depths 0 .. down_blocks - 1
    vae_scale: int  # image pixels per latent pixel
    text_layers: int  # the text encoder's layers as loaded (SD2: the last OpenCLIP block is dropped)

    @property
    def min_side(self) -> int:
        """The smallest image side: the latent must survive every halving of the U-Net."""
        return self.vae_scale * 2 ** (self.down_blocks - 1)


def read_shape(path: Path) -> ModelShape | None:
    """The shape of the checkpoint at `path` from its header or configs; None when they do not
    tell (a pickle, an unusual layout): the loader's own checks then apply."""
    try:
        if path.is_dir():
            return _from_folder(path)
        if path.suffix.lower() == ".safetensors" and path.is_file():
            return _from_safetensors(path)
    except Exception:  # noqa: BLE001 - damaged or unusual (safetensors' errors have their own class):
        return None  # the loader reports it in its own words
    return None


def _from_safetensors(path: Path) -> ModelShape | None:
    from safetensors import safe_open

    from library.models.detect import DetectionError, detect_model, normalize_keys

    with safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    rename = normalize_keys(list(shapes))
    try:
        spec = detect_model({new: shapes[old] for old, new in rename.items()})
    except DetectionError:
        return None
    if spec.family not in ("sd1", "sd2"):  # SDXL: Deep Shrink depths are its input blocks, another count
        return None
    vae_levels = len(spec.vae.get("block_out_channels", ())) or 1
    return ModelShape(len(spec.unet["down_block_types"]), 2 ** (vae_levels - 1),
                      spec.text_encoder["num_hidden_layers"])


def _from_folder(path: Path) -> ModelShape | None:
    configs = [path / part / "config.json" for part in ("unet", "vae", "text_encoder")]
    if not all(c.is_file() for c in configs):
        return None
    unet, vae, text = (json.loads(c.read_text(encoding="utf-8")) for c in configs)
    if unet.get("addition_embed_type") is not None:  # SDXL: Deep Shrink depths are its input blocks
        return None
    return ModelShape(len(unet["down_block_types"]), 2 ** (len(vae["block_out_channels"]) - 1),
                      int(text["num_hidden_layers"]))
