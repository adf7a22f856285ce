"""Checks of the parsed command line that need no file and no model (see `library.records.limits`).

`check_options` runs inside `library.cli.parser.validate`, so a mistake is reported in the time it
takes to parse the arguments: non-finite numbers, seeds, image sizes, steps per sampler,
an empty `--outdir`.
"""

from __future__ import annotations

import argparse

from library.records import limits
from library.errors import UserError

_FLOAT_OPTIONS = ("scale", "ddim_eta", "negative_scale", "strength", "highres_fix_scale", "highres_fix_strength",
                  "vae_batch_size", "network_mul", "control_net_weights", "control_net_ratios")


def check_options(args: argparse.Namespace) -> None:
    """Ranges the rest of `cli.validate` does not check; raises `UserError` with one line."""
    limits.check_finite((f"--{name}", getattr(args, name, None)) for name in _FLOAT_OPTIONS)
    if args.seed is not None:
        limits.check_seed(args.seed)
    for name in ("W", "H"):
        if getattr(args, name) is not None:  # None: 512, or the img2img source's size
            limits.check_side(getattr(args, name), f"--{name}")
    limits.check_steps(args.steps, args.sampler)
    if getattr(args, "highres_fix_scale", None) is not None:
        limits.check_steps(args.highres_fix_steps, args.sampler, "--highres_fix_steps")
    if not str(args.outdir).strip():
        raise UserError("--outdir is empty: give the folder for the images (default: outputs)")
