"""Convert a Stable Diffusion 1.x/2.x/XL model between a single file and a Diffusers folder.

    python tools/convert_model.py SRC DST [--fp16 | --bf16] [--vae VAE] [--v_parameterization]

SRC is anything `gen_img.py --ckpt` accepts (file, folder, HF ID in the local cache). If DST
ends with `.safetensors` a single file in the original (LDM) key layout is written, else a
Diffusers folder. The model kind (SD1/SD2/SDXL, v-prediction) is detected and carried over: a
v-prediction single file gets a `v_pred` key, a folder a scheduler config saying so.
Weights keep fp32 unless `--fp16`/`--bf16` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError


def convert(src: str, dst: Path, dtype: torch.dtype, vae: str | None = None, v_parameterization: bool = False) -> str:
    """Load `src`, write `dst`; return the kind written (sd1, sd2, sd2-v, sdxl or sdxl-v)."""
    from library.models import load_model
    from library.models.save import save_diffusers_folder, save_single_file

    model = load_model(src, vae=vae, dtype=dtype, v_parameterization=v_parameterization)
    model.vae.to(dtype)  # stored as asked (an SDXL VAE loads in fp32 for fp16 runs)
    family = model.kind.family
    kind = "sd1" if family == "sd1" else family + ("-v" if model.kind.v_prediction else "")
    if dst.suffix.lower() == ".safetensors":
        save_single_file(model.text_encoder, model.unet, model.vae, kind, dst, text_encoder_2=model.text_encoder_2)
    elif dst.suffix:
        raise UserError(f"{dst}: write a .safetensors file or a folder (no other suffix)")
    else:
        save_diffusers_folder(model.text_encoder, model.tokenizer, model.unet, model.vae, kind, dst,
                              model.text_encoder_2, model.tokenizer_2)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst", type=Path)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="store float16 weights")
    precision.add_argument("--bf16", action="store_true", help="store bfloat16 weights")
    parser.add_argument("--vae", help="replace the VAE with this one")
    parser.add_argument("--v_parameterization", action="store_true", help="mark the model as v-prediction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    try:
        kind = convert(args.src, args.dst, dtype, args.vae, args.v_parameterization)
    except UserError as exc:
        print(f"convert_model.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({kind}, {str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
