"""Write tiny SD1 / SD2 / SD2-v models with fixed random weights, in the real file layouts.

    python tools/make_tiny_model.py OUTDIR [--kinds sd1 sd2 sd2-v]

For each kind it writes `tiny-<kind>.safetensors` (one file, original LDM key layout, as
downloaded from model sites) and `tiny-<kind>/` (a Diffusers folder with unet/, vae/,
text_encoder/, tokenizer/, scheduler/) holding the same weights; plus `tiny-vae.safetensors`,
a separate VAE with other weights (for `--vae`), and for SD1 a Textual Inversion embedding
`goodembed.safetensors` and a kohya LoRA `tiny-lora-sd1.safetensors`. The v-prediction file carries a `v_pred`
key and its folder a scheduler config with `prediction_type: v_prediction`, as real ones
can. Existing outputs are kept, so calling it again is free. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.ldm_export import vae_to_ldm  # noqa: E402
from library.models.save import save_diffusers_folder, save_single_file, save_tensors  # noqa: E402
from library.models.tiny import KINDS, build_tiny_components  # noqa: E402


def make_tiny_models(outdir: Path, kinds=KINDS) -> dict[str, Path]:
    """Write the tiny models of `kinds` (and the separate VAE) into `outdir`; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in kinds:
        single, folder = outdir / f"tiny-{kind}.safetensors", outdir / f"tiny-{kind}"
        if not (single.is_file() and (folder / "model_index.json").is_file()):
            from library.models.tokenizer import load_tokenizer

            c = build_tiny_components(kind, seed=0)
            save_single_file(c.text_encoder, c.unet, c.vae, kind, single)
            tokenizer = load_tokenizer("sd1" if kind == "sd1" else "sd2")
            save_diffusers_folder(c.text_encoder, tokenizer, c.unet, c.vae, kind, folder)
        paths[kind], paths[f"{kind}-diffusers"] = single, folder
    vae_path = outdir / "tiny-vae.safetensors"
    if not vae_path.is_file():
        save_tensors(vae_to_ldm(build_tiny_components("sd1", seed=1).vae.state_dict()), vae_path)
    paths["vae"] = vae_path
    if "sd1" in kinds:
        paths.update(_extras(outdir))
    return paths


def _extras(outdir: Path) -> dict[str, Path]:
    """Files that go with the tiny SD1 model: a 2-vector embedding and a kohya LoRA."""
    import torch

    from library.embeddings import write_embedding
    from networks.lora_files import write_kohya_lora

    embedding, lora = outdir / "goodembed.safetensors", outdir / "tiny-lora-sd1.safetensors"
    if not (embedding.is_file() and lora.is_file()):
        c = build_tiny_components("sd1", seed=0)
        width = c.text_encoder.config.hidden_size
        vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5)) * 0.5
        write_embedding(embedding, vectors)
        write_kohya_lora(lora, c.text_encoder, c.unet, rank=4, seed=0)
    return {"embedding": embedding, "lora": lora}


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
