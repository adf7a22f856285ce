"""File hashes shown in image metadata: A1111's `Model hash` and the "addnet" LoRA hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

from library.errors import UserError

_HASH_CHUNK = 1024 * 1024


def model_hash(path: Path) -> str:
    """A1111 `Model hash`: the first 10 hex digits of the whole file's SHA-256."""
    return _sha256_from(path, 0)[:10]


def addnet_hash_safetensors(path: Path) -> str:
    """SHA-256 (hex) of a safetensors file's tensor data, skipping its JSON header.

    This is the "addnet" hash A1111 uses for `Lora hashes` (first 12 digits there).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    if len(head) < 8:
        raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); replace it")
    return _sha256_from(path, int.from_bytes(head, "little") + 8)


def _sha256_from(path: Path, offset: int) -> str:
    """SHA-256 hex of the file from `offset` to its end, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    return digest.hexdigest()
