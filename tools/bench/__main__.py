"""`python -m tools.bench COMMAND [options]`: the one entry of the benchmarks.

Each command is a module of this package with `add_arguments(parser)` (its options),
`command(args) -> int` (the run) and optionally `check_arguments(args) -> str | None` (an
error message for option values that cannot run). Only the chosen command's module is
imported, so `--help` is quick and no benchmark module is imported that the run does not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# command -> (module of this package, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("pipeline", "our txt2img path and model load against diffusers' StableDiffusionPipeline"),
    "unet": ("unet", "U-Net calls with our attention processor against diffusers', interleaved; profiles"),
    "process": ("process", "whole gen_img.py processes: start-up overhead, first image, peak RSS"),
    "lora": ("lora", "U-Net steps with no LoRA, a LoRA un-merged, pre-calculated and merged"),
    "deep-shrink": ("deep_shrink", "one U-Net call with and without Deep Shrink"),
    "guidance": ("guidance", "CLIP / VGG16 guidance per step: time and peak memory against plain steps"),
    "vae-memory": ("vae_memory", "peak memory of a full-size VAE decode or encode: plain, slices, tiling"),
    "sdxl": ("sdxl", "SDXL: U-Net s/call against diffusers' StableDiffusionXLPipeline, process wall and peak RSS"),
    "report": ("report", "the figures of record in one run: start-up, peak RSS, U-Net against diffusers"),
}
PROG = "python -m tools.bench"


def command_module(name: str) -> ModuleType:
    """The module of command `name` (imported now)."""
    return importlib.import_module(f"{__package__ or 'tools.bench'}.{COMMANDS[name][0]}")


def build_parser(chosen: str | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The entry's parser and one sub-parser per command; only `chosen` gets its options
    (and its module's docstring as description)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Benchmarks of gen_img.py (docs/performance.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {}
    for name, (_module, help_line) in COMMANDS.items():
        if name == chosen:
            module = command_module(name)
            parsers[name] = sub.add_parser(name, help=help_line, description=module.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(parsers[name])
        else:
            parsers[name] = sub.add_parser(name, help=help_line, description=help_line)
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    """Parse the command and its options, then run it; its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, parsers = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    module = command_module(args.command)
    check = getattr(module, "check_arguments", None)
    problem = check(args) if check else None
    if problem:
        parsers[args.command].error(problem)
    from tools.bench.common import setup_logging

    setup_logging()
    return module.command(args)


if __name__ == "__main__":
    sys.exit(main())
