"""A1111 file hashes (library.images.hashes): the model hash, and remembering it per file version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from library.errors import UserError
from library.images.hashes import model_hash, model_hash_cached, start_model_hash

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


# ----------------------------------------------------------------------------- the cache


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SDGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDGEN_HASH_CACHE", raising=False)
    return tmp_path / "cache"


def test_hash_is_computed_once_per_file_version(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    expected = model_hash(model)
    assert model_hash_cached(model) == expected
    assert (cache_dir / "model_hashes.json").is_file()
    calls = []
    monkeypatch.setattr("library.images.hashes.model_hash", lambda path: calls.append(path) or "x" * 10)
    assert model_hash_cached(model) == expected and calls == []  # remembered
    model.write_bytes(b"other weights" * 1000)
    os.utime(model, ns=(1, 1))
    assert model_hash_cached(model) == "x" * 10 and len(calls) == 1  # a changed file is hashed again


def test_cache_can_be_switched_off_and_a_broken_cache_is_ignored(tmp_path: Path, cache_dir: Path,
                                                                  monkeypatch) -> None:
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"abc" * 100)
    cache_dir.mkdir()
    (cache_dir / "model_hashes.json").write_text("{not json")
    assert model_hash_cached(model) == model_hash(model)
    monkeypatch.setenv("SDGEN_HASH_CACHE", "0")
    monkeypatch.setattr("library.images.hashes.model_hash", lambda path: "y" * 10)
    assert model_hash_cached(model) == "y" * 10


def test_background_hash_is_shared_per_path(tmp_path: Path, cache_dir: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"z" * 4096)
    first = start_model_hash(model)
    assert start_model_hash(model) is first
    assert first.result(timeout=30) == model_hash(model)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "{not json", "[1, 2]"])
def test_a_damaged_cache_is_ignored_with_one_warning_and_rebuilt(tmp_path, cache_dir, caplog, content) -> None:
    """A deeply nested cache (RecursionError in the JSON parser), broken JSON or another JSON
    value: the hash is computed, one warning, and the file is replaced by a good one."""
    import json
    import logging

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    cache_dir.mkdir()
    (cache_dir / "model_hashes.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="library.images.hashes"):
        assert model_hash_cached(model) == model_hash(model)
        assert model_hash_cached(model) == model_hash(model)
    reason = {"[": "nested too deep", "{": "Expecting property name enclosed in double quotes: line 1 column 2 "
              "(char 1)", "[1": "not a JSON object"}[content[:2] if content.startswith("[1") else content[0]]
    assert [r.getMessage() for r in caplog.records] == [
        f"model hash cache {cache_dir / 'model_hashes.json'} is damaged ({reason}); ignored, and rebuilt with this "
        "run's hashes"]
    assert list(json.loads((cache_dir / "model_hashes.json").read_text()).values()) == [model_hash(model)]
