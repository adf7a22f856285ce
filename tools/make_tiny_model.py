"""Write tiny SD1 / SD2 / SD2-v models with fixed random weights, in the real file layouts.

    python tools/make_tiny_model.py OUTDIR [--kinds sd1 sd2 sd2-v]

For each kind it writes `tiny-<kind>.safetensors` (one file, original LDM key layout, as
downloaded from model sites) and `tiny-<kind>/` (a Diffusers folder with unet/, vae/,
text_encoder/, tokenizer/, scheduler/) holding the same weights; plus `tiny-vae.safetensors`,
a separate VAE with other weights (for `--vae`). The v-prediction file carries a `v_pred`
key and its folder a scheduler config with `prediction_type: v_prediction`, as real ones
can. Existing outputs are kept, so calling it again is free. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.ldm_export import to_ldm_checkpoint, vae_to_ldm  # noqa: E402
from library.models.tiny import KINDS, build_tiny_components  # noqa: E402

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


def make_tiny_models(outdir: Path, kinds=KINDS) -> dict[str, Path]:
    """Write the tiny models of `kinds` (and the separate VAE) into `outdir`; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in kinds:
        single, folder = outdir / f"tiny-{kind}.safetensors", outdir / f"tiny-{kind}"
        if not (single.is_file() and (folder / "model_index.json").is_file()):
            components = build_tiny_components(kind, seed=0)
            _write_single_file(components, single)
            _write_diffusers_folder(components, folder)
        paths[kind], paths[f"{kind}-diffusers"] = single, folder
    vae_path = outdir / "tiny-vae.safetensors"
    if not vae_path.is_file():
        _save(vae_to_ldm(build_tiny_components("sd1", seed=1).vae.state_dict()), vae_path)
    paths["vae"] = vae_path
    return paths


def _write_single_file(components, path: Path) -> None:
    te_sd = dict(components.text_encoder.state_dict())
    if components.kind != "sd1":
        te_sd.update(_unused_last_block(te_sd, components.text_encoder.config.num_hidden_layers))
    ckpt = to_ldm_checkpoint(
        components.unet.state_dict(),
        components.vae.state_dict(),
        te_sd,
        dict(components.unet.config),
        components.kind,
    )
    _save(ckpt, path)


def _unused_last_block(te_sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD2 files hold one text-encoder block more than SD2 uses; add one (a copy of block 0)."""
    first = "encoder.layers.0."
    return {
        k.replace(first, f"encoder.layers.{layers}."): v.clone()
        for k, v in te_sd.items()
        if k.removeprefix("text_model.").startswith(first)
    }


def _write_diffusers_folder(components, folder: Path) -> None:
    from library.models.tokenizer import load_tokenizer

    family = "sd1" if components.kind == "sd1" else "sd2"
    components.unet.save_pretrained(folder / "unet")
    components.vae.save_pretrained(folder / "vae")
    components.text_encoder.save_pretrained(folder / "text_encoder")
    load_tokenizer(family).save_pretrained(folder / "tokenizer")
    scheduler = dict(SCHEDULER_CONFIG)
    scheduler["prediction_type"] = "v_prediction" if components.kind == "sd2-v" else "epsilon"
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write atomically so an interrupted run leaves no half-written model."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    for name, path in make_tiny_models(args.outdir, tuple(args.kinds)).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
