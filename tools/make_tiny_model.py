"""Write tiny SD1 / SD2 / SD2-v / SDXL models with fixed random weights, in the real file layouts.

    python tools/make_tiny_model.py OUTDIR [--kinds sd1 sd2 sd2-v sdxl]

The model files written are listed in `library/models/tiny_files.py`, which does that work;
`write_tiny_extras` adds what goes with the SD1 model: a Textual Inversion embedding
`goodembed.safetensors` and a kohya LoRA `tiny-lora-sd1.safetensors`; and with the SDXL
model: an SDXL embedding `goodxl.safetensors` (`clip_l` + `clip_g`) and a kohya SDXL LoRA
`tiny-lora-sdxl.safetensors` (`lora_te1_`, `lora_te2_`, `lora_unet_` with LoCon convs).
Existing outputs are kept, so calling it again is free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.tiny import KINDS, build_tiny_components
from library.models.tiny_files import make_tiny_models


def write_tiny_extras(outdir: Path) -> dict[str, Path]:
    """Files that go with the tiny SD1 model (a 2-vector embedding and a kohya LoRA) and the
    tiny SDXL (the same for SDXL)."""
    import torch

    from library.text.embeddings import write_embedding
    from networks.lora_files import write_kohya_lora

    embedding, lora = outdir / "goodembed.safetensors", outdir / "tiny-lora-sd1.safetensors"
    if not (embedding.is_file() and lora.is_file()):
        c = build_tiny_components("sd1", seed=0)
        width = c.text_encoder.config.hidden_size
        vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5)) * 0.5
        write_embedding(embedding, vectors)
        write_kohya_lora(lora, c.text_encoder, c.unet, rank=4, seed=0)
    return {"embedding": embedding, "lora": lora, **_sdxl_extras(outdir)}


def _sdxl_extras(outdir: Path) -> dict[str, Path]:
    """The tiny SDXL's 2-vector embedding (clip_l + clip_g) and kohya LoRA (te1, te2, U-Net, convs)."""
    import torch

    from library.text.embeddings import write_sdxl_embedding
    from networks.lora_files import write_kohya_lora

    embedding, lora = outdir / "goodxl.safetensors", outdir / "tiny-lora-sdxl.safetensors"
    if not (embedding.is_file() and lora.is_file()):
        c = build_tiny_components("sdxl", seed=0)
        g = torch.Generator().manual_seed(6)
        clip_l = torch.randn(2, c.text_encoder.config.hidden_size, generator=g) * 0.5
        clip_g = torch.randn(2, c.text_encoder_2.config.hidden_size, generator=g) * 0.5
        write_sdxl_embedding(embedding, clip_l, clip_g)
        write_kohya_lora(lora, c.text_encoder, c.unet, rank=4, seed=0, conv=True, text_encoder_2=c.text_encoder_2)
    return {"embedding-sdxl": embedding, "lora-sdxl": lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    paths = make_tiny_models(args.outdir, tuple(args.kinds))
    if "sd1" in args.kinds:
        paths.update(write_tiny_extras(args.outdir))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
