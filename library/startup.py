"""The start and the end of a `gen_img.py` process, where a run spends time outside generating.

* `parse_options`: the command line (`library.cli.parse_options`), then the checkpoint is read
  and cast in a background thread (`library.models.prefetch`) while the main thread goes on
  importing diffusers and transformers (~2 s more on the machine of docs/performance.md).
  `--help` and argument errors exit inside parsing, before anything is read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from library.cli import parse_options as parse_command_line

if TYPE_CHECKING:
    import torch

    from library.options import LoadOptions, Options

logger = logging.getLogger(__name__)


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
