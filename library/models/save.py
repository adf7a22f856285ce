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
SDXL_MODEL_INDEX = {
    **MODEL_INDEX,
    "_class_name": "StableDiffusionXLPipeline",
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}
#: SDXL's scheduler settings differ from SD's only in the timestep spacing.
SDXL_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}


def save_single_file(text_encoder, unet, vae, kind: str, path: Path, dtype: torch.dtype | None = None,
                     text_encoder_2=None) -> None:
    """One `.safetensors` in the original key layout (`kind`: sd1, sd2, sd2-v, sdxl or sdxl-v;
    SDXL also takes `text_encoder_2`)."""
    te_sd = dict(text_encoder.state_dict())
    if kind in ("sd2", "sd2-v"):
        te_sd.update(unused_last_block(te_sd, text_encoder.config.num_hidden_layers))
    te2_sd = dict(text_encoder_2.state_dict()) if text_encoder_2 is not None else None
    ckpt = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), te_sd, dict(unet.config), kind, te2_sd)
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


def save_diffusers_folder(text_encoder, tokenizer, unet, vae, kind: str, folder: Path,
                          text_encoder_2=None, tokenizer_2=None) -> None:
    """A Diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL adds
    text_encoder_2/ and tokenizer_2/)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    vae.save_pretrained(tmp / "vae")
    text_encoder.save_pretrained(tmp / "text_encoder")
    tokenizer.save_pretrained(tmp / "tokenizer")
    sdxl = kind.startswith("sdxl")
    if sdxl:
        text_encoder_2.save_pretrained(tmp / "text_encoder_2")
        tokenizer_2.save_pretrained(tmp / "tokenizer_2")
    base = SDXL_SCHEDULER_CONFIG if sdxl else SCHEDULER_CONFIG
    scheduler = dict(base, prediction_type="v_prediction" if kind.endswith("-v") else "epsilon")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (tmp / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX if sdxl else MODEL_INDEX, indent=2))
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
