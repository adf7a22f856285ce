"""Keep glibc's allocator from holding freed memory that the model's peak then counts twice.

By default glibc raises its mmap threshold up to 32 MB once large blocks are freed, so
later tensors of a few MB come from the heap, whose freed space is returned to the system
only from its top; and every thread that allocates gets its own arena. During generation
the activations freed by one network then stay resident beside the next one's (~0.1-0.2 GB
more peak RSS for a full-size fp32 model at 256x256, measured with tools/bench_process.py).
`limit_heap_retention` fixes the mmap threshold at 4 MB (blocks that large are mapped and
unmapped, so freed ones leave at once), trims the heap above 4 MB free, and allows at most
2 arenas. glibc only: elsewhere it does nothing. Called once per process by `load_model`.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_LIMIT = 4 << 20
_done = False


def limit_heap_retention() -> bool:
    """Set glibc's `mallopt` limits (once); whether they were applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, _LIMIT), (_M_TRIM_THRESHOLD, _LIMIT), (_M_ARENA_MAX, 2)))
    logger.debug("mallopt limits %s", "set" if ok else "partly refused")
    _done = True
    return ok
