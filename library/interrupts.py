"""Ctrl+C ends a run within a second at any image size, with one line and only complete files.

Python delivers Ctrl+C (SIGINT) as `KeyboardInterrupt` only between bytecodes of the main
thread: a single torch operation (a VAE convolution at 2048x2048 on a CPU, tens of seconds)
would hold it back. `install` (the `gen_img.py` process only; tests calling `main()` keep
Python's handler) therefore adds a watchdog thread, woken through `signal.set_wakeup_fd` the
moment the signal arrives, even while the main thread is inside a torch call:

- The first Ctrl+C raises `KeyboardInterrupt` in the main thread as usual, which ends the run
  through its normal path (`gen_img.main` prints `interrupted`, status 130). If the main thread
  has not taken it within `GRACE_S`, it is stuck in a long operation: the watchdog ends the
  process itself.
- Any later Ctrl+C (while the first is being handled) never raises again, so it cannot
  interrupt the handling with a traceback; the watchdog ends the process at once.

Ending the process: the one `interrupted` line (`announce`; never twice, whoever comes first),
the hidden temporary files of images being written are removed (`temporary_file` registers
them; published images are complete, since a name only ever gets a whole file), and
`os._exit(130)`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

#: How long the main thread has to take the first Ctrl+C before the watchdog ends the process.
GRACE_S = 0.5
INTERRUPTED_STATUS = 130

_announced = threading.Lock()
_reacted = threading.Event()
_temporary: set[Path] = set()
_temporary_lock = threading.Lock()


def announce() -> None:
    """Print the run's one `interrupted` line (only the first call prints)."""
    if _announced.acquire(blocking=False):
        print("interrupted", file=sys.stderr, flush=True)


@contextlib.contextmanager
def temporary_file(path: Path) -> Iterator[None]:
    """Mark `path` as a file being written, which an interrupted process removes on its way out."""
    with _temporary_lock:
        _temporary.add(path)
    try:
        yield
    finally:
        with _temporary_lock:
            _temporary.discard(path)


def install() -> None:
    """Route Ctrl+C through the handler and the watchdog (main thread only)."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _handler)
    thread = threading.Thread(target=_watch, args=(reader, writer), name="ctrl-c watchdog", daemon=True)
    thread.start()


def _handler(signum, frame) -> None:
    """In the main thread: the first Ctrl+C raises `KeyboardInterrupt`; later ones do nothing
    here (the watchdog ends the process)."""
    if _reacted.is_set():
        return
    _reacted.set()
    raise KeyboardInterrupt


def _watch(reader: socket.socket, writer: socket.socket) -> None:  # writer: kept open with the thread
    """Wait for Ctrl+C; end the process when the main thread is stuck or a second one comes."""
    seen = 0
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        for number in data:
            if number != signal.SIGINT:
                continue
            seen += 1
            if seen > 1 or not _reacted.wait(GRACE_S):
                end_process()


def end_process() -> None:
    """The one line, no temporary file left, status 130, now."""
    announce()
    with _temporary_lock:
        for path in list(_temporary):
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(INTERRUPTED_STATUS)
