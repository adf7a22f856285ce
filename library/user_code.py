"""Importing the user's own Python files (`--from_module`, `--highres_fix_upscaler x.py`).

These are files the user chose to run, never model files (those are only read as tensors).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from library.errors import UserError, first_line


def import_file(path: str | Path, option: str) -> ModuleType:
    """Import the Python file `path` as a module; a missing file is a `UserError` naming `option`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{option} {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"user_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UserError(f"{option} {path}: not a Python file (name it .py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except (SyntaxError, ValueError) as exc:  # not Python source at all (ValueError: null bytes)
        sys.modules.pop(spec.name, None)
        raise UserError(f"{option} {path}: not a Python file ({type(exc).__name__}: {first_line(exc, 80)})") from None
    return module
