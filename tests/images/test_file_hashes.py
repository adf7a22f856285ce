"""Tests for library/images/file_hashes.py: the A1111 model hash."""

from __future__ import annotations

import hashlib

import pytest

from library.errors import UserError
from library.images.file_hashes import model_hash

# ----------------------------------------------------------------------------- hashes


def test_model_hash_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: spans several 1 MiB chunks
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    (tmp_path / "abc").write_bytes(b"abc")
    assert model_hash(tmp_path / "abc") == "ba7816bf8f"


def test_missing_model_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.safetensors: cannot read it \(No such file or directory\); check the path$"):
        model_hash(tmp_path / "nope.safetensors")
