"""Reading and casting a checkpoint's weights while the libraries are still importing.

A generating run spends ~3.5 s importing torch, diffusers and transformers in one Python
thread before `load_model` can start, and the load then spends ~1 s casting a 2 GB fp16 file
to fp32/bf16 (or ~0.15 s mapping its pages in the file's own dtype). Both the cast (torch
releases the GIL inside each copy) and the page-in (`madvise`) run in native code, so
`start` does them in a background thread right after the options are parsed, on the second
core, while the main thread imports. `load_model` then `take`s the result instead of
reading the file.

The thread does exactly what `loader` does, only earlier and in one pass: `read_state_dict`,
`normalize_keys`, every tensor a network will use cast with `.to(dtype)` in file order, each
source's file pages released right after its copy (`checkpoint.FilePages`), the tensors
used as stored paged in. What `load_model` leaves alone stays alone: keys of no component,
the last block of an SD2 text encoder, and a VAE encoder loaded on first use. The result
is used only by a load with the very same request (file path, size and modification time,
dtypes, encoder mode); any other load, or a failure in the thread, reads the file as before,
and the error (if any) is reported by that read. Only `.safetensors` single files are read
ahead (a pickle's loading cannot be split from its reading).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What a load asks for; a prefetch serves only an equal request."""

    path: str  # real path
    size: int
    mtime_ns: int
    dtype: "torch.dtype"
    vae_dtype: "torch.dtype"
    lazy_encoder: bool

    @classmethod
    def of(cls, path: Path, dtype: "torch.dtype", vae_dtype: "torch.dtype", lazy_encoder: bool) -> "Request | None":
        """The request for `path`, or None when it is not a file that can be read ahead."""
        if path.suffix.lower() != ".safetensors":
            return None
        try:
            info = os.stat(path)
        except OSError:
            return None
        return cls(os.path.realpath(path), info.st_size, info.st_mtime_ns, dtype, vae_dtype, lazy_encoder)


class _Prefetch:
    """One background read; `result()` waits for it (None when it failed)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._state: dict[str, torch.Tensor] | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._state = read_cast(self.request)
        except Exception as exc:  # noqa: BLE001 - the load reads the file again and reports the error
            logger.debug("prefetch of %s failed: %r", self.request.path, exc)

    def result(self) -> "dict[str, torch.Tensor] | None":
        self._thread.join()
        state, self._state = self._state, None
        return state


_slot: _Prefetch | None = None
_slot_lock = threading.Lock()


def start(path: Path, dtype: "torch.dtype", vae_dtype: "torch.dtype", lazy_encoder: bool) -> bool:
    """Begin reading `path` for a load with these settings (replacing an unused earlier one);
    whether a read was started."""
    global _slot
    request = Request.of(path, dtype, vae_dtype, lazy_encoder)
    with _slot_lock:
        _slot = _Prefetch(request) if request is not None else None
    return request is not None


def take(path: Path, dtype: "torch.dtype", vae_dtype: "torch.dtype",
         lazy_encoder: bool) -> "dict[str, torch.Tensor] | None":
    """The prefetched state dict (LDM keys as stored; used tensors cast and resident) if one
    was started for exactly this request, else None. The slot is emptied either way."""
    global _slot
    with _slot_lock:
        pending, _slot = _slot, None
    if pending is None:
        return None
    if pending.request != Request.of(path, dtype, vae_dtype, lazy_encoder):
        logger.debug("prefetch of %s not used: the load asks for something else", pending.request.path)
        return None
    state = pending.result()
    logger.debug("prefetch of %s: %s", pending.request.path, "used" if state is not None else "failed, reading again")
    return state


def read_cast(request: Request) -> "dict[str, torch.Tensor]":
    """The file's tensors, each one a network will use in its run dtype (what `loader` does)."""
    from library.models import checkpoint
    from library.models.detect import VAE_PREFIX, SD2_TE_PREFIX, normalize_keys
    from library.models.heap import limit_heap_retention

    limit_heap_retention()  # before the copies are allocated, as load_model does
    path = Path(request.path)
    raw = checkpoint.read_state_dict(path)
    pages = checkpoint.FilePages(path)
    rename = normalize_keys(list(raw))
    skipped = _sd2_last_block(rename.values(), SD2_TE_PREFIX)
    encoder = f"{VAE_PREFIX}encoder."
    out = dict(raw)
    kept = []
    used = [old for old, new in rename.items() if raw[old].is_floating_point()
            and not (request.lazy_encoder and new.startswith(encoder))
            and not (skipped is not None and new.startswith(skipped))]
    for old in sorted(used, key=lambda k: raw[k].data_ptr()):
        source = raw[old]
        target = request.vae_dtype if rename[old].startswith(VAE_PREFIX) else request.dtype
        if source.dtype == target:
            kept.append(source)
            continue
        out[old] = source.to(target)
        pages.release(source)
    checkpoint.populate(kept)
    return out


def _sd2_last_block(keys, prefix: str) -> str | None:
    """The key prefix of an SD2 text encoder's last block, which the loader never reads."""
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return f"{prefix}transformer.resblocks.{max(blocks)}." if blocks else None
