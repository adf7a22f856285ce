"""The file hash shown in image metadata: A1111's `Model hash`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from library.errors import UserError

_HASH_CHUNK = 1024 * 1024


def model_hash(path: Path) -> str:
    """A1111 `Model hash`: the first 10 hex digits of the whole file's SHA-256.

    The file is read in 1 MiB chunks, so a multi-GB checkpoint is never held in memory.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    return digest.hexdigest()[:10]
