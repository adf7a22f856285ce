"""A1111 `parameters` items that describe the run's extra models, so that web UIs and image
sites (civitai) identify them: `VAE hash`/`VAE`, `Eta DDIM`, `Lora hashes`, `TI hashes`, and
the `<lora:name:weight>` tags A1111 prompts carry (facts in shared/reference/png-metadata.md).

Hashes as the web UI computes them: `VAE hash` the first 10 hex digits of the file's SHA-256
(like `Model hash`); a LoRA's short hash the first 12 hex digits of the SHA-256 of a
.safetensors file after its header (the "addnet" hash; other formats: of the whole file); a
TI embedding's the first 12 hex digits of the whole file's SHA-256. Names lose `:` and `,`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from library.images.file_hashes import model_hash

_CHUNK = 1024 * 1024


def _sha256(path: Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def lora_short_hash(path: Path) -> str:
    """A1111's LoRA short hash: 12 hex of the SHA-256 after the safetensors header (whole file otherwise)."""
    start = 0
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            start = int.from_bytes(f.read(8), "little") + 8
    return _sha256(path, start)[:12]


def embedding_short_hash(path: Path) -> str:
    """A1111's TI short hash: 12 hex of the whole file's SHA-256."""
    return _sha256(path)[:12]


def _name(path: str) -> str:
    return Path(path).stem.replace(":", "").replace(",", "")


def _listing(pairs: Sequence[tuple[str, str]]) -> str | None:
    return ", ".join(f"{name}: {short}" for name, short in pairs) or None


def run_parameters(*, vae: str | None, sampler: str, ddim_eta: float, lora_files: Sequence[str],
                   embedding_files: Sequence[str]) -> tuple[tuple[str, object], ...]:
    """The run's A1111 items, in A1111's order; absent ones left out."""
    items: list[tuple[str, object]] = []
    if vae and Path(vae).is_file():
        items += [("VAE hash", model_hash(Path(vae))), ("VAE", Path(vae).name)]
    elif vae:
        items.append(("VAE", Path(vae).name))
    if ddim_eta and sampler.lower().removesuffix("_karras") == "ddim":
        items.append(("Eta DDIM", ddim_eta))
    loras = [(_name(f), lora_short_hash(Path(f))) for f in lora_files if Path(f).is_file()]
    embeddings = [(_name(f), embedding_short_hash(Path(f))) for f in embedding_files if Path(f).is_file()]
    items += [(key, value) for key, value in (("Lora hashes", _listing(loras)), ("TI hashes", _listing(embeddings)))
              if value is not None]
    return tuple(items)


def lora_tags(lora_files: Sequence[str], multipliers: Sequence[float]) -> str:
    """`<lora:name:weight>` for each network, as A1111 prompts carry them (empty without networks)."""
    return "".join(f" <lora:{_name(f)}:{w:g}>" for f, w in zip(lora_files, multipliers))
