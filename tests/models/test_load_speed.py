"""The load-time measures of `library.models`: background page-in, paused GC, no-op moves skipped."""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models import checkpoint, load_model
from library.models.checkpoint import coalesce_spans, paging_in
from library.models.loader import _move

PAGE = 4096


def test_coalesce_spans_joins_touching_pages_and_splits_at_a_whole_page() -> None:
    assert coalesce_spans([(10 * PAGE + 8, 10 * PAGE + 100), (10 * PAGE + 100, 12 * PAGE + 5)]) == [
        (10 * PAGE, 3 * PAGE)
    ]
    assert coalesce_spans([(0, 100), (2 * PAGE, 2 * PAGE + 8)]) == [(0, PAGE), (2 * PAGE, PAGE)]
    assert coalesce_spans([(PAGE, PAGE + 4), (0, PAGE)]) == [(0, 2 * PAGE)]  # unsorted, adjacent pages
    assert coalesce_spans([(5, 5), (0, 10), (3, 7)]) == [(0, PAGE)]  # empty and nested spans
    assert coalesce_spans([]) == []


def _rss_file_kib() -> int:
    """File-backed resident memory of this process (pages of mapped files it has mapped in)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def _kernel_can_populate() -> bool:
    area = mmap.mmap(-1, PAGE)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(area))
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ok = madvise(address, PAGE, 22) == 0
        del address
        return ok
    finally:
        gc.collect()
        try:
            area.close()
        except BufferError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ is Linux-only")
def test_paging_in_maps_every_page_of_memory_mapped_weights(tmp_path: Path) -> None:
    if not _kernel_can_populate():
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux < 5.14)")
    path = tmp_path / "weights.safetensors"
    save_file({f"w{i:02d}": torch.full((1024, 1024), float(i), dtype=torch.float16) for i in range(24)}, str(path))
    path.read_bytes()  # in the page cache, as after any earlier run
    start = _rss_file_kib()
    tensors = list(load_file(str(path)).values())  # memory-mapped, nothing touched yet
    before = _rss_file_kib()
    assert before - start < 8 * 1024  # control: loading alone maps (almost) nothing
    threads = threading.active_count()
    with paging_in(tensors):
        pass
    assert _rss_file_kib() - before >= 46 * 1024  # 48 MiB of weights now mapped
    assert threading.active_count() == threads  # the page-in thread is done when the block ends
    assert [float(t[0, 0]) for t in tensors] == [float(i) for i in range(24)]


def test_paging_in_ignores_tensors_that_are_not_on_the_cpu() -> None:
    with paging_in([torch.empty(3, device="meta")]):
        pass


def test_load_model_restores_the_garbage_collector(tiny_models, tmp_path: Path) -> None:
    assert gc.isenabled()
    load_model(str(tiny_models["sd1"]))
    assert gc.isenabled()
    bad = tmp_path / "bad.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(UserError):
        load_model(str(bad))
    assert gc.isenabled()
    gc.disable()
    try:
        load_model(str(tiny_models["sd1"]))
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_load_model_pages_in_the_weights_it_keeps(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = checkpoint._page_runs
    monkeypatch.setattr(checkpoint, "_page_runs", lambda tensors: seen.append(len(tensors)) or original(tensors))
    load_model(str(tiny_models["sd1"]), dtype=torch.float32)  # the tiny files are fp32
    load_model(str(tiny_models["sd1"]), dtype=torch.float16)  # every tensor is cast: nothing to page in
    if sys.platform.startswith("linux"):
        assert len(seen) == 1 and seen[0] > 100


def test_move_skips_modules_already_on_the_device() -> None:
    module = torch.nn.Linear(2, 2)

    def no_to(*args, **kwargs):
        raise AssertionError(".to called")

    module.to = no_to
    assert _move(module, torch.device("cpu")) is module
    del module.to
    moved = _move(module, torch.device("meta"))
    assert moved.weight.device.type == "meta"


def test_load_controlnet_pages_in_its_weights(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    from library.models.controlnet import load_controlnet

    unet = load_model(str(tiny_models["sd1"])).unet
    seen: list[int] = []
    original = checkpoint._page_runs
    monkeypatch.setattr(checkpoint, "_page_runs", lambda tensors: seen.append(len(tensors)) or original(tensors))
    net = load_controlnet(str(tiny_models["controlnet-sd1"]), unet, torch.float32, "cpu")
    if sys.platform.startswith("linux"):
        assert seen == [len(net.state_dict())]  # every ControlNet tensor, nothing else of the file
