"""The model hash is remembered per file version (library.images.hash_cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from library.images.file_hashes import model_hash
from library.images import hash_cache


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SDGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDGEN_HASH_CACHE", raising=False)
    return tmp_path / "cache"


def test_hash_is_computed_once_per_file_version(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    expected = model_hash(model)
    assert hash_cache.model_hash_cached(model) == expected
    assert (cache_dir / "model_hashes.json").is_file()
    calls = []
    monkeypatch.setattr("library.images.file_hashes.model_hash", lambda path: calls.append(path) or "x" * 10)
    assert hash_cache.model_hash_cached(model) == expected and calls == []  # remembered
    model.write_bytes(b"other weights" * 1000)
    os.utime(model, ns=(1, 1))
    assert hash_cache.model_hash_cached(model) == "x" * 10 and len(calls) == 1  # a changed file is hashed again


def test_cache_can_be_switched_off_and_a_broken_cache_is_ignored(tmp_path: Path, cache_dir: Path,
                                                                  monkeypatch) -> None:
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"abc" * 100)
    cache_dir.mkdir()
    (cache_dir / "model_hashes.json").write_text("{not json")
    assert hash_cache.model_hash_cached(model) == model_hash(model)
    monkeypatch.setenv("SDGEN_HASH_CACHE", "0")
    monkeypatch.setattr("library.images.file_hashes.model_hash", lambda path: "y" * 10)
    assert hash_cache.model_hash_cached(model) == "y" * 10


def test_background_hash_is_shared_per_path(tmp_path: Path, cache_dir: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"z" * 4096)
    first = hash_cache.start_model_hash(model)
    assert hash_cache.start_model_hash(model) is first
    assert first.result(timeout=30) == model_hash(model)
