"""The end of a `gen_img.py` process: no interpreter teardown after the last image.

`exit_without_teardown` is for the `__main__` path only. After the interpreter has joined
every non-daemon thread and run the exit handlers registered after this module was imported
(torch's, multiprocessing's, ...), logging is shut down (log files flushed and closed),
stdout and stderr are flushed, and the process ends with `os._exit(status)`: the ~1 s the
interpreter would spend freeing a loaded model's tensors and modules one by one is left to
the kernel, which unmaps the whole process at once. In-process callers (tests calling
`gen_img.main()`) never arm it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

_exit_status: int | None = None


def exit_without_teardown(status: int) -> NoReturn:
    """`sys.exit(status)` that ends the process once the exit handlers ran, skipping the teardown."""
    global _exit_status
    _exit_status = status
    sys.exit(status)


def _end_process() -> None:
    """Registered at import, so it runs after the exit handlers of every module imported later."""
    if _exit_status is None:
        return
    logging.shutdown()
    _flush_open_files()
    os._exit(_exit_status)


def _flush_open_files() -> None:
    """Flush stdout and stderr. Every other file of a run is written in a `with` block (images,
    metadata, the hash cache, `--console_log_file` closed by `gen_img.main`), so nothing else is
    open with buffered data; finding open file objects among the ~0.5 M objects of a loaded
    run (`gc.get_objects`) would cost 0.45 s, half of what is saved."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


atexit.register(_end_process)
