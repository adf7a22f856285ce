"""The web UI's extra-network tags in prompts: `<lora:NAME[:TE[:UNET[:DYN]]]>`, `<hypernet:NAME[:MULT]>`.

A tag is `<KIND:ARGS>` (the web UI's pattern ``<(\\w+):([^>]+)>``); ARGS split at ``:``, and an
item ``key=value`` is named (`<lora:x:te=0.5:unet=1>`). Tags are cut from the prompt text
before it is encoded; what they ask for becomes part of the image's `Job`
(`library.records.extra_networks`), so images with different tags never share a batch (unlike
the web UI, which applies the first prompt's tags to its whole batch).

- `<lora:NAME>` (and `<lyco:NAME>`, the same): TE defaults to 1, UNET to TE. DYN (DyLoRA's
  rank) is not supported: given, it is ignored with a warning.
- `<hypernet:NAME>`: MULT defaults to 1.
- NAME is a file name without its extension, found (also in sub-folders) in `--lora_dir`, or in
  the folders of the `--network_weights` files themselves (not their sub-folders: such a folder
  may be any folder), or (also in sub-folders) in `--hypernetwork_dir`. A name that is not
  found is an error listing the close names there.

Every mistake is a `UserError` naming the tag; the caller skips the prompt line.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import UserError
from library.records.extra_networks import HypernetUse, LoraUse

logger = logging.getLogger(__name__)

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
HYPERNET_KIND = "hypernet"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
HYPERNET_SUFFIXES = (".pt",)


@dataclass(frozen=True)
class Tag:
    """One tag as written: its kind, positional and named arguments."""

    text: str  # the whole tag, for messages
    kind: str
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...] = ()

    def argument(self, index: int, key: str) -> str | None:
        """The named argument `key`, else positional `index`, else None."""
        for name, value in self.named:
            if name == key:
                return value
        return self.positional[index] if index < len(self.positional) else None


def split_tags(prompt: str) -> tuple[str, tuple[Tag, ...]]:
    """`prompt` without its tags (cut out as the web UI does, the ends stripped), and the tags in order."""
    tags = tuple(_tag(match) for match in TAG.finditer(prompt))
    if not tags:
        return prompt, ()
    return TAG.sub("", prompt).strip(), tags


def _tag(match: re.Match) -> Tag:
    kind = match.group(1).lower()
    if kind not in (*LORA_KINDS, HYPERNET_KIND):
        raise UserError(f"{match.group(0)}: unknown tag type '{match.group(1)}' (known: <lora:NAME:WEIGHT>, "
                        "<lyco:NAME:WEIGHT>, <hypernet:NAME:MULT>)")
    positional, named = [], []
    for item in match.group(2).split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named.append((key.strip().lower(), value.strip()))
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise UserError(f"{match.group(0)}: the tag names no file (write <{kind}:NAME>)")
    return Tag(match.group(0), kind, tuple(positional), tuple(named))


def _number(tag: Tag, what: str, text: str | None, default: float) -> float:
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{tag.text}: {what} '{text}' is not a number")
    return value


@dataclass
class NetworkFiles:
    """Where tag names are looked up: LoRA folders and hypernetwork folders (listed once each)."""

    lora_dirs: tuple[str, ...] = ()
    hypernetwork_dirs: tuple[str, ...] = ()
    flat_dirs: tuple[str, ...] = ()  # LoRA folders searched without their sub-folders
    _listings: dict[tuple[str, tuple[str, ...]], dict[str, list[Path]]] = field(default_factory=dict, repr=False)

    def find(self, tag: Tag, name: str) -> Path:
        """The file NAME of `tag` names, or a `UserError` with the close names."""
        lora = tag.kind in LORA_KINDS
        folders = tuple(dict.fromkeys((*self.lora_dirs, *self.flat_dirs))) if lora else self.hypernetwork_dirs
        option = "--lora_dir (or the folder of a --network_weights file)" if lora else "--hypernetwork_dir"
        if not folders:
            raise UserError(f"{tag.text}: no folder to look for '{name}' in; give {option}")
        stems: dict[str, list[Path]] = {}
        for folder in folders:
            for stem, paths in self._listing(folder, LORA_SUFFIXES if lora else HYPERNET_SUFFIXES).items():
                stems.setdefault(stem, []).extend(paths)
        found = stems.get(name) or next((p for s, p in stems.items() if s.lower() == name.lower()), None)
        if found:
            return sorted(found, key=_suffix_rank)[0]
        close = difflib.get_close_matches(name, list(stems), n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UserError(f"{tag.text}: no file named '{name}' in {', '.join(folders)}{hint}")

    def _listing(self, folder: str, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
        key = (folder, suffixes)
        if key not in self._listings:
            stems: dict[str, list[Path]] = {}
            root = Path(folder)
            found = (root.glob("*") if folder in self.flat_dirs and folder not in self.lora_dirs
                     else root.rglob("*")) if root.is_dir() else ()
            files = sorted(p for p in found if p.suffix.lower() in suffixes and p.is_file())
            for path in files:
                stems.setdefault(path.stem, []).append(path)
            self._listings[key] = stems
        return self._listings[key]


def _suffix_rank(path: Path) -> tuple[int, str]:
    suffix = path.suffix.lower()
    return (LORA_SUFFIXES.index(suffix) if suffix in LORA_SUFFIXES else len(LORA_SUFFIXES), str(path))


@dataclass(frozen=True)
class ExtraNetworks:
    """What the tags of one prompt ask for."""

    loras: tuple[LoraUse, ...] = ()
    hypernetworks: tuple[HypernetUse, ...] = ()

    def __add__(self, other: ExtraNetworks) -> ExtraNetworks:
        return ExtraNetworks(self.loras + other.loras, self.hypernetworks + other.hypernetworks)


def resolve(tags: Sequence[Tag], files: NetworkFiles) -> ExtraNetworks:
    """The tags' networks, each NAME found in `files`."""
    loras, hypernets = [], []
    for tag in tags:
        name = tag.positional[0]
        if tag.kind in LORA_KINDS:
            te = _number(tag, "TE weight", tag.argument(1, "te"), 1.0)
            unet = _number(tag, "UNET weight", tag.argument(2, "unet"), te)
            if tag.argument(3, "dyn") not in (None, ""):
                logger.warning("%s: DYN (DyLoRA rank) is not supported; the full LoRA is used", tag.text)
            loras.append(LoraUse(name, str(files.find(tag, name)), te, unet))
        else:
            multiplier = _number(tag, "multiplier", tag.argument(1, "multiplier"), 1.0)
            hypernets.append(HypernetUse(name, str(files.find(tag, name)), multiplier))
    return ExtraNetworks(tuple(loras), tuple(hypernets))


def prompt_networks(prompt: str, files: NetworkFiles) -> tuple[str, ExtraNetworks]:
    """`prompt` without its tags, and the networks they ask for."""
    text, tags = split_tags(prompt)
    return text, resolve(tags, files) if tags else ExtraNetworks()
