"""Model loading: any SD 1.x / 2.x / XL checkpoint, offline. See `loader.load_model`.

The names below load `library.models.loader` (and torch) on first use, so that modules such
as `library.models.checkpoint` can be used before torch is imported (preflight checks).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from library.models.loader import LoadedModel, ModelKind, load_model, load_vae

__all__ = ["LoadedModel", "ModelKind", "load_model", "load_vae"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("library.models.loader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
