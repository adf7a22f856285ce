"""Writing models: a single LDM-layout `.safetensors`, or a Diffusers folder.

Used by `tools/convert_model.py` and `library/models/tiny_files.py`. Files are written to a
temporary name and renamed, so an interrupted write never leaves a half model behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from library.models.ldm_export import to_ldm_checkpoint

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def save_single_file(text_encoder, unet, vae, kind: str, path: Path, dtype: torch.dtype | None = None) -> None:
    """One `.safetensors` in the original key layout (`kind`: sd1, sd2 or sd2-v)."""
    te_sd = dict(text_encoder.state_dict())
    if kind != "sd1":
        te_sd.update(unused_last_block(te_sd, text_encoder.config.num_hidden_layers))
    ckpt = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), te_sd, dict(unet.config), kind)
    if dtype is not None:
        ckpt = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.items()}
    save_tensors(ckpt, path)


def unused_last_block(te_sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD2 files hold one text-encoder block more than SD2 uses (the loader drops the last);
    a model converted from Diffusers has none, so a copy of its last block stands in."""
    last = f"encoder.layers.{layers - 1}."
    return {
        k.replace(last, f"encoder.layers.{layers}."): v.clone()
        for k, v in te_sd.items()
        if k.removeprefix("text_model.").startswith(last)
    }


def save_diffusers_folder(text_encoder, tokenizer, unet, vae, kind: str, folder: Path) -> None:
    """A Diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    vae.save_pretrained(tmp / "vae")
    text_encoder.save_pretrained(tmp / "text_encoder")
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler = dict(SCHEDULER_CONFIG, prediction_type="v_prediction" if kind == "sd2-v" else "epsilon")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors` file written atomically (under a temporary name of this process's own, so
    processes that write the same file at once do not meet)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
