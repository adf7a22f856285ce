"""A1111 `parameters` items that describe the run's extra models, so that web UIs and image
sites (civitai) identify them: `VAE hash`/`VAE`, `Eta DDIM`, `Lora hashes`, `TI hashes`, and
the `<lora:name:weight>` tags A1111 prompts carry.

The hashes are A1111's (`library.images.hashes`). Names lose `:` and `,`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from library.images.hashes import embedding_short_hash, lora_short_hash, model_hash


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


def prompt_tags(job) -> str:
    """The web UI's tags of a `Job`'s `<lora:...>` / `<hypernet:...>` uses, for the A1111 prompt
    (the `prompt` key holds the text without them, `raw-prompt` the line as written)."""
    return "".join(f" {use.tag()}" for use in (*job.loras, *job.hypernetworks))


#: A1111 fields that several producers may write (the run's networks and the prompt's tags): joined.
JOINED_FIELDS = ("Lora hashes",)


def joined_fields(items: Sequence[tuple[str, object]]) -> tuple[tuple[str, object], ...]:
    """`items` with the values of a repeated `JOINED_FIELDS` key joined by ", " at its first place
    (an entry both give is listed once)."""
    out: list[tuple[str, object]] = []
    for key, value in items:
        first = next((i for i, (k, _) in enumerate(out) if k == key), None)
        if key in JOINED_FIELDS and first is not None:
            entries = dict.fromkeys([*str(out[first][1]).split(", "), *str(value).split(", ")])
            out[first] = (key, ", ".join(entries))
        else:
            out.append((key, value))
    return tuple(out)
