"""The start and the end of a `gen_img.py` process, where a run spends time outside generating.

* `parse_options`: the command line (`library.cli.parse_options`), then the checkpoint is read
  and cast in a background thread (`library.models.prefetch`) while the main thread goes on
  importing diffusers and transformers (~2 s more on the machine of docs/performance.md).
  `--help` and argument errors exit inside parsing, before anything is read.
* `exit_without_teardown`: the end of the `__main__` path only. After the interpreter has
  joined every non-daemon thread and run the exit handlers registered after this module was
  imported (torch's, multiprocessing's, ...), logging is shut down (log files flushed and
  closed), stdout and stderr are flushed, and the process ends with `os._exit(status)`: the
  ~1 s the interpreter would spend freeing a loaded model's tensors and modules one by one
  is left to the kernel, which unmaps the whole process at once. In-process callers (tests
  calling `gen_img.main()`) never arm it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from library.cli import parse_options as parse_command_line

if TYPE_CHECKING:
    import torch

    from library.options import LoadOptions, Options

logger = logging.getLogger(__name__)

_exit_status: int | None = None


def parse_options(argv: Sequence[str] | None = None) -> "Options":
    """The run's options (`library.cli.parse_options`), with the checkpoint's weights already
    being read for the load that `build.load` will ask for."""
    options = parse_command_line(argv)
    prefetch_checkpoint(options.load)
    return options


def run_dtypes(options: "LoadOptions") -> "tuple[torch.dtype, torch.dtype]":
    """The networks' dtype and the VAE's: `--fp16` / `--bf16` (else fp32); `--no_half_vae` fp32."""
    import torch

    dtype = torch.float16 if options.fp16 else torch.bfloat16 if options.bf16 else torch.float32
    return dtype, torch.float32 if options.no_half_vae else dtype


def prefetch_checkpoint(options: "LoadOptions") -> bool:
    """Start reading `--ckpt` as `build.load` will load it (a single `.safetensors` file only)."""
    if not options.ckpt or not Path(options.ckpt).is_file():
        return False
    from library.models import prefetch

    dtype, vae_dtype = run_dtypes(options)
    # with --vae the checkpoint's own VAE is made in the run dtype (load_model), then replaced
    return prefetch.start(Path(options.ckpt), dtype, dtype if options.vae else vae_dtype, lazy_encoder=True)


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
