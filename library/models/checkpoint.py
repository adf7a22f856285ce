"""Finding a model on disk and reading tensors from it safely.

`resolve_model_path` turns what the user typed for `--ckpt` / `--vae` (a file, a folder, a
glob matching one file, a symlink, or a Hugging Face model ID already in the local cache)
into a path. `read_state_dict` reads `.safetensors` with `safetensors` and `.ckpt`/`.pt`/
`.bin` with `torch.load(weights_only=True)`, so a pickle that wants to run code is refused,
never executed. Every failure is a `UserError` naming the file and what to do.
`paging_in` maps the pages of memory-mapped weights into the process in the background;
`FilePages` drops the pages of weights already copied into another dtype, so a cast load never
holds the whole file and all its converted copies at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import pickle
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where tensors are read: resolving a path (preflight) needs no torch
    import torch

from library.errors import UserError, first_line

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str, option: str = "--ckpt") -> Path:
    """Return the file or folder that `spec` names; HF IDs come from the local cache only."""
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(spec)))
        if len(matches) != 1:
            found = ", ".join(matches[:5]) or "nothing"
            raise UserError(f"{option} {spec}: the pattern must match exactly one file, it matched {found}")
        spec = matches[0]
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return path.absolute()  # keep a symlink's own name: a .yaml may sit beside the link
    if path.is_symlink():
        raise UserError(f"{option} {spec}: the symlink points to {os.readlink(path)}, which does not exist")
    if _HF_ID.match(spec) and not spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        return _from_hf_cache(spec, option)
    raise UserError(f"{option} {spec}: no such file or folder")


def _from_hf_cache(repo_id: str, option: str) -> Path:
    """The snapshot folder of `repo_id` in the local Hugging Face cache (never the network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends; message varies by version
        logger.debug("HF cache lookup failed: %r", exc)
        raise UserError(
            f"{option} {repo_id}: no such file or folder, and not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            "download it once with network access, or pass a checkpoint file or folder"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, on the CPU, in their stored dtypes."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _read_pickle(path)
    raise UserError(f"{path}: unknown model file type {suffix!r}; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise UserError(
            f"{path}: not a readable safetensors file ({first_line(exc)}); the file may be truncated or damaged, "
            "download it again"
        ) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(pickle_refusal(path, exc)) from None
    except Exception as exc:
        raise UserError(f"{path}: damaged: not a readable checkpoint ({first_line(exc, 120)}); "
                        "download it again") from None
    return _flatten(data, path)


def _flatten(data: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle: unwrap `state_dict`/`model`, keep tensor values only."""
    import torch

    while isinstance(data, dict):
        inner = data.get("state_dict", data.get("model")) if len(data) < 20 else None
        if isinstance(inner, dict):
            data = inner
            continue
        break
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: contains no tensors")
    return tensors


@contextlib.contextmanager
def paging_in(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Map the memory pages of `tensors` into the process from a background thread.

    Weights read with `safetensors` (and `.ckpt` files read with `mmap=True`) stay memory-mapped
    when no dtype cast is needed; every 4 KiB page is then mapped on first touch, one page
    fault at a time, which for a 2 GB fp16 model costs ~0.2 s inside the first U-Net step. One
    `madvise(MADV_POPULATE_READ)` call per contiguous run maps them in ~0.14 s, and running it
    in a thread overlaps it with the Python-bound work of building the networks (the call
    releases the GIL). Linux 5.14+ only; elsewhere, or when the kernel refuses, pages are
    simply mapped on first touch as before. The tensors are kept alive until the block ends,
    so their memory cannot be unmapped while the thread works on it.
    """
    kept = [t for t in tensors if t.device.type == "cpu"]
    thread = None
    if sys.platform.startswith("linux") and kept:
        thread = threading.Thread(target=_populate, args=(_page_runs(kept),), name="page-in", daemon=True)
        thread.start()
    try:
        yield
    finally:
        if thread is not None:
            thread.join()
        del kept


_MADV_POPULATE_READ = 22  # linux/mman.h, since Linux 5.14
_PAGE = 4096
_CHUNK = 32 << 20  # one call per 32 MiB: long calls stall the loading thread's memory mapping


def _page_runs(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-aligned (start, length) runs covering the storages of `tensors`."""
    storages = (t.untyped_storage() for t in tensors)
    return coalesce_spans({(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages})


def coalesce_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) byte spans -> page-aligned (start, length) runs over the pages they touch.

    Spans whose pages touch or overlap join one run (tensors of one file mapping are packed
    with gaps far below a page); a whole page between two spans splits the run, since that
    page may not be mapped at all.
    """
    runs: list[list[int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        start &= ~(_PAGE - 1)
        end = (end + _PAGE - 1) & ~(_PAGE - 1)
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    return [(start, end - start) for start, end in runs]


def _populate(runs: list[tuple[int, int]]) -> None:
    """`madvise(MADV_POPULATE_READ)` over each run; failures only mean pages map on first touch."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    for run_start, run_length in runs:
        for start in range(run_start, run_start + run_length, _CHUNK):
            length = min(_CHUNK, run_start + run_length - start)
            if madvise(start, length, _MADV_POPULATE_READ) != 0:
                logger.debug("madvise(MADV_POPULATE_READ) failed: %s", os.strerror(ctypes.get_errno()))
                return


def pickle_refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """Why `torch.load(weights_only=True)` refused a pickle: it asks for code, or it is damaged.

    torch words both alike ("Weights only load failed"). A refused "GLOBAL module.name" means
    code; so does an unsupported opcode in a plain pickle whose opcodes (read with
    `pickletools`, nothing executed) build objects. Anything else is damage.
    """
    wanted = _GLOBAL.search(str(exc))
    if wanted is not None or (path.is_file() and _builds_objects(path)):
        asks = f" ({wanted.group(1)})" if wanted else ""
        return (f"{path}: refused to load: this pickle file wants to run code{asks}, which could be unsafe; "
                "convert it to .safetensors with a trusted tool, or get a .safetensors version")
    return f"{path}: damaged: not a readable checkpoint (the pickle data is broken); download it again"


def _builds_objects(path: Path) -> bool:
    """A plain (non-zip) pickle whose opcodes call or build objects; False for unreadable data."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return False  # torch's zip format: its data.pkl failed on an opcode, i.e. it is damaged
    try:
        with open(path, "rb") as f:
            return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(f))
    except (ValueError, OSError, EOFError):
        return False


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
_GLOBAL = re.compile(r"GLOBAL (\S+)")



_MADV_DONTNEED = 4  # linux/mman.h


class FilePages:
    """The memory mappings of one checkpoint file in this process, and dropping their pages.

    safetensors (and `torch.load(mmap=True)`) give tensors backed by a private, read-only-used
    mapping of the file. When the run's dtype differs from the file's, every tensor is copied
    into the new dtype; without help, each source page stays mapped until the whole state dict
    is freed, so a 2 GB fp16 file loaded as fp32 peaks at 2 GB of file pages + 4 GB of copies.
    `release(tensor)` calls `madvise(MADV_DONTNEED)` on the pages of `tensor`'s storage right
    after its copy is made: the pages leave the process (they stay in the page cache), and if
    the same bytes are read again (a neighbouring tensor sharing a boundary page, a second view
    of one storage) the kernel maps them from the file again. Nothing writes to these mappings
    while loading, so no modified copy-on-write page can be lost.

    Only addresses inside mappings of this very file (found in `/proc/self/maps` by device and
    inode) are ever released, so a tensor in anonymous memory (a sum, a `torch.cat`, a legacy
    pickle read without mmap) is never touched. Elsewhere than Linux, or when the file is not
    mapped, `release` does nothing and the load peaks as before.
    """

    def __init__(self, path: Path) -> None:
        self._ranges = _file_mappings(path) if sys.platform.startswith("linux") else []
        self._madvise = _libc_madvise() if self._ranges else None
        self.released_bytes = 0

    @property
    def active(self) -> bool:
        """Whether the file is mapped here and pages can be released."""
        return self._madvise is not None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the mapped pages of `tensor`'s storage (only where they lie in the file's mappings)."""
        if self._madvise is None or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        start &= ~(_PAGE - 1)
        end = (end + _PAGE - 1) & ~(_PAGE - 1)
        for low, high in self._ranges:
            first, last = max(start, low), min(end, high)
            if first < last and self._madvise(first, last - first, _MADV_DONTNEED) == 0:
                self.released_bytes += last - first


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's mappings of the file at `path`."""
    try:
        info = os.stat(path)
        real = os.path.realpath(path)
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] != str(info.st_ino):
            continue
        major, minor = (int(part, 16) for part in fields[3].split(":"))
        # overlay file systems show the lower device in the maps; the path then tells it apart
        if os.makedev(major, minor) != info.st_dev and fields[5] != real:
            continue
        low, high = (int(part, 16) for part in fields[0].split("-"))
        ranges.append((low, high))
    return ranges


def _libc_madvise():
    """libc's `madvise` through ctypes, or None where it cannot be found."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
