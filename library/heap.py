"""Keep glibc's allocator from holding freed memory that the model's peak then counts twice.

By default glibc raises its mmap threshold up to 32 MB once large blocks are freed, so
later tensors of a few MB come from the heap, whose freed space is returned to the system
only from its top; and every thread that allocates gets its own arena. During generation
the activations freed by one network then stay resident beside the next one's (~0.1-0.2 GB
more peak RSS for a full-size fp32 model at 256x256, measured with `python -m tools.bench process`).
`limit_heap_retention` allows at most 2 arenas and fixes the mmap threshold and the trim
threshold at 64 MB; `release_freed_memory` (`malloc_trim`) hands what the heap holds free back
to the system between phases (after the load, before each VAE decode), where the peak is;
`mapped_blocks_from` maps every block of 4 MB or more during the decode itself.

Why not smaller thresholds: at 4 MB (this project's first setting) every activation of 4 MB
or more was a fresh mmap with its page faults: a bf16 512x512 U-Net call took 4.35-4.88 s
instead of 3.53-3.60 s (2026-12-01, one process, interleaved), and blocked attention's 4 MB
score blocks were 2.9x slower. glibc only: elsewhere both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_AT = 64 << 20  # blocks this large are mapped (and unmapped when freed)
_TRIM_AT = 64 << 20  # free memory at the heap's top beyond this goes back to the system
_done = False


def limit_heap_retention() -> bool:
    """Set glibc's `mallopt` limits (once); whether they were applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    applied = [_mallopt(option, value) for option, value in (
        (_M_MMAP_THRESHOLD, _MMAP_AT), (_M_TRIM_THRESHOLD, _TRIM_AT), (_M_ARENA_MAX, 2))]
    if not any(applied):  # no glibc
        return False
    logger.debug("mallopt limits %s", "set" if all(applied) else "partly refused")
    _done = True
    return all(applied)


@functools.cache
def _libc_function(name: str, *argtypes):
    """The C library's `name` with its argument types set, looked up once; None where absent
    (not glibc: musl has no mallopt or malloc_trim)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def _mallopt(option: int, value: int) -> bool:
    """glibc's `mallopt(option, value)`; whether it was applied (False without glibc)."""
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and mallopt(option, value) == 1


@contextlib.contextmanager
def mapped_blocks_from(size: int) -> Iterator[None]:
    """Within the block, allocations of `size` bytes or more are mapped and unmapped when freed.

    Used around the VAE decode, the peak of a txt2img run: its large activations then never
    stay in the heap beside the next ones (fp32 256x256: peak 4.96-5.00 GB instead of
    4.97-5.15 GB), for +0.2 s of page faults at 256x256 (1.65 -> 1.85 s per decode) and none
    measurable at 512x512. Only where `limit_heap_retention` has set the limits.
    """
    if not _done:
        yield
        return
    _mallopt(_M_MMAP_THRESHOLD, size)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, _MMAP_AT)


def release_freed_memory() -> None:
    """Return the heap's free memory to the system (glibc `malloc_trim`; elsewhere nothing)."""
    malloc_trim = _libc_function("malloc_trim", ctypes.c_size_t) if _done else None
    if malloc_trim is not None:
        malloc_trim(0)
