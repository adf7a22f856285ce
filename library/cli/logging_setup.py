"""Logging set-up from the original's `--console_log_level/--console_log_file/--console_log_simple`."""

from __future__ import annotations

import argparse
import logging

NOISY_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "PIL")
FULL_FORMAT = "%(levelname)s %(name)s: %(message)s"
SIMPLE_FORMAT = "%(message)s"


def configure_logging(args: argparse.Namespace | None = None) -> logging.Handler | None:
    """Root logging at `--console_log_level` (default INFO), on the console, or appended to
    `--console_log_file` (UTF-8) instead; `--console_log_simple` drops level and logger name.
    The libraries' own chatter stays at ERROR unless the level is DEBUG. Returns the file
    handler it added (None on the console), so a caller running several times can remove it."""
    level_name = getattr(args, "console_log_level", None)
    level = getattr(logging, level_name or "INFO")
    log_file = getattr(args, "console_log_file", None)
    fmt = SIMPLE_FORMAT if getattr(args, "console_log_simple", False) else FULL_FORMAT
    root = logging.getLogger()
    handler: logging.Handler | None = None
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
        root.setLevel(level)
    else:
        logging.basicConfig(level=level, format=fmt)
        if level_name:  # basicConfig leaves an already configured root alone; an explicit level still counts
            root.setLevel(level)
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == logging.DEBUG else logging.ERROR)
    return handler
