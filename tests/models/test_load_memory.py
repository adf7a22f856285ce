"""Cast loads drop each source tensor's file pages once it is copied (`checkpoint.FilePages`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models import checkpoint, load_model
from library.models.loader import cast_state

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise")


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file({f"w{i:02d}": torch.full((1024, 1024), float(i), dtype=torch.float16) for i in range(24)}, str(path))
    path.read_bytes()  # in the page cache
    return path


@linux_only
def test_cast_releases_the_pages_of_each_converted_tensor(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    raw = load_file(str(path))
    pages = checkpoint.FilePages(path)
    assert pages.active
    start = _rss_file_kib()
    cast = cast_state(raw, torch.float32, pages)
    assert _rss_file_kib() - start < 2 * 1024  # 48 MiB read, (almost) none of it still mapped
    assert pages.released_bytes >= 48 * 1024 * 1024
    assert all(cast[f"w{i:02d}"].dtype == torch.float32 and float(cast[f"w{i:02d}"][5, 7]) == i for i in range(24))
    assert [float(t[3, 3]) for t in raw.values()] == [float(i) for i in range(24)]  # sources read again from the file


@linux_only
def test_without_release_the_file_pages_stay_mapped(tmp_path: Path) -> None:
    """Control for the test above: the plain cast leaves every page it read mapped."""
    raw = load_file(str(_weights(tmp_path)))
    start = _rss_file_kib()
    cast_state(raw, torch.float32)
    assert _rss_file_kib() - start >= 46 * 1024


def test_only_mappings_of_the_file_itself_are_released(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    pages = checkpoint.FilePages(path)  # nothing of it is mapped yet
    anonymous = torch.full((1024, 1024), 3.0)
    pages.release(anonymous)
    assert pages.released_bytes == 0 and float(anonymous.min()) == 3.0
    raw = load_file(str(path))
    pages = checkpoint.FilePages(path)
    pages.release(anonymous)  # memory outside the file's mappings is never touched
    assert float(anonymous.min()) == 3.0 and pages.released_bytes == 0
    pages.release(raw["w05"])
    assert float(raw["w05"].min()) == 5.0  # a released page reads back from the file


def test_cast_load_gives_the_same_weights(tiny_models) -> None:
    reference = load_model(str(tiny_models["sd1"]), dtype=torch.float32)  # the tiny files are fp32
    half = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16)
    for name, tensor in half.unet.state_dict().items():
        assert torch.equal(tensor, reference.unet.state_dict()[name].to(torch.bfloat16)), name
