"""Which model family a file is for, read from headers and configs only (no tensor data).

The preflight checks use this to refuse an SDXL LoRA or embedding with an SD 1.x/2.x
checkpoint (and the reverse) in a second, before any model loads. Only what the names
alone tell is used; when they do not tell (a pickle, a U-Net-only LoRA of an unclear
layout), the answer is None and the loaders report a mismatch later, as before.

* Checkpoint: a `.safetensors` header (tensor names and shapes) goes through the same
  detection as loading (`library.models.detect`); a Diffusers folder's `unet/config.json`
  (`addition_embed_type: text_time` is SDXL) and `text_encoder/config.json` (gelu: SD 2.x).
* LoRA: SDXL files name ``lora_te1_`` / ``lora_te2_`` / ``text_encoder_2.`` layers or
  transformer blocks past the first; SD 1.x/2.x files name ``lora_te_`` layers or attention
  at the first U-Net level (which SDXL does not have).
* Embedding: SDXL files hold ``clip_l`` and ``clip_g``; SD 1.x/2.x files ``emb_params`` or
  ``string_to_param``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Literal

from library.models.detect import DetectionError, detect_family, normalize_keys

#: "sdxl", or "sd" for SD 1.x/2.x (whose LoRAs and embeddings the names cannot tell apart).
Generation = Literal["sd", "sdxl"]

_SDXL_LORA = re.compile(r"^(lora_te[12]_|text_encoder_2\.)|transformer_blocks[._][1-9]")
_SD_LORA = re.compile(r"^lora_te_|(down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._])")


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} of a `.safetensors` file from its JSON header; None if unreadable."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def checkpoint_family(path: Path) -> str | None:
    """"sd1", "sd2" or "sdxl" for a `.safetensors` checkpoint or Diffusers folder; None when unknown."""
    if path.is_dir():
        return _folder_family(path)
    if path.suffix.lower() != ".safetensors":
        return None
    shapes = safetensors_header(path)
    if not shapes:
        return None
    rename = normalize_keys(list(shapes))
    try:
        return detect_family({new: shapes[old] for old, new in rename.items()})
    except DetectionError:
        return None


def _folder_family(path: Path) -> str | None:
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        if unet.get("addition_embed_type") == "text_time":
            return "sdxl"
        te = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def lora_generation(path: Path) -> Generation | None:
    """Whether a `.safetensors` LoRA is for SDXL or SD 1.x/2.x; None when the names do not tell."""
    shapes = safetensors_header(path) if path.suffix.lower() == ".safetensors" else None
    if not shapes:
        return None
    if any(_SDXL_LORA.search(k) for k in shapes):
        return "sdxl"
    if any(_SD_LORA.search(k) for k in shapes):
        return "sd"
    return None


def embedding_generation(path: Path) -> Generation | None:
    """Whether a `.safetensors` embedding is SDXL's (clip_l + clip_g) or SD 1.x/2.x's; None otherwise."""
    shapes = safetensors_header(path) if path.suffix.lower() == ".safetensors" else None
    if not shapes:
        return None
    if "clip_l" in shapes and "clip_g" in shapes:
        return "sdxl"
    if "emb_params" in shapes or "string_to_param" in shapes or len(shapes) == 1:
        return "sd"
    return None
