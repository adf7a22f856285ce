"""Tests for library/file_hashes.py: A1111 model hash and the addnet LoRA hash."""

from __future__ import annotations

import hashlib

import pytest
import torch

from library.errors import UserError
from library.file_hashes import addnet_hash_safetensors, model_hash

# ----------------------------------------------------------------------------- hashes


def test_model_hash_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: spans several 1 MiB chunks
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    (tmp_path / "abc").write_bytes(b"abc")
    assert model_hash(tmp_path / "abc") == "ba7816bf8f"


def test_addnet_hash_skips_header(tmp_path):
    header = b'{"__metadata__":{"a":"b"}}'
    path = tmp_path / "l.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"tensor bytes")
    assert addnet_hash_safetensors(path) == hashlib.sha256(b"tensor bytes").hexdigest()
    with pytest.raises(UserError, match=r"short\.safetensors: not a safetensors file \(shorter than 8 bytes\); replace it$"):
        (tmp_path / "short.safetensors").write_bytes(b"abc")
        addnet_hash_safetensors(tmp_path / "short.safetensors")


def test_addnet_hash_real_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(path), metadata={"ss_network_dim": "4"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash_safetensors(path) == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert addnet_hash_safetensors(path) == hashlib.sha256(torch.arange(6, dtype=torch.float32).numpy().tobytes()).hexdigest()


def test_missing_model_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.safetensors: cannot read it \(No such file or directory\); check the path$"):
        model_hash(tmp_path / "nope.safetensors")
