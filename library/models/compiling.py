"""`--compile`: `torch.compile` of the U-Net and the VAE decoder, with a persistent cache.

The modules are compiled in place (`nn.Module.compile`), so every reference to them (the
Pipeline, hooks, LoRA networks, attention processors set later) stays valid. Compiling
happens on the first call of each shape (minutes on a small CPU); inductor's on-disk caches
(FX graph and AOT autograd caches, on by default) make later runs with the same shapes load
the compiled code instead, and within one run every later batch reuses it. The cache folder
is `$TORCHINDUCTOR_CACHE_DIR` or, if unset, `~/.cache/sdgen/inductor` (instead of /tmp).

When compiling cannot work here (no C++ compiler for inductor's CPU code, or the first call
fails to compile) a one-line warning says why and the run continues uncompiled.
Blocked attention (`library.models.attention.blocked_attention`) is left out of the graphs: its
per-head loop would unroll into thousands of nodes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def compile_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` cannot be used on `device` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"this PyTorch ({torch.__version__}) has no torch.compile"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None and shutil.which("c++") is None:
            return f"inductor needs a C++ compiler for CPU code and none was found ({compiler}, c++)"
    return None


def compile_networks(unet: torch.nn.Module, vae: torch.nn.Module, device: torch.device) -> bool:
    """Compile `unet` and `vae.decoder` in place; False (with a warning) when not possible."""
    reason = compile_unavailable(device)
    if reason is not None:
        logger.warning("--compile: not compiling (%s); running uncompiled", reason)
        return False
    _use_persistent_cache()
    # diffusers' upsampler calls an lru_cache'd version check; dynamo warns about it once per graph
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    _exclude_blocked_attention()
    for name, module in (("U-Net", unet), ("VAE decoder", vae.decoder)):
        _compile_with_fallback(module, name)
    logger.info("--compile: U-Net and VAE decoder compile on their first call (cache %s)",
                os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return True


def _use_persistent_cache() -> None:
    """Inductor's caches in ~/.cache/sdgen/inductor unless the user chose a folder.

    Importing diffusers already sets TORCHINDUCTOR_CACHE_DIR to inductor's default (in /tmp,
    which may be cleared at boot); that value is replaced, any other is kept.
    """
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = default_cache_dir()
    except (ImportError, AttributeError):
        default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "sdgen" / "inductor")


def _exclude_blocked_attention() -> None:
    import library.models.attention as attention

    if not getattr(attention.blocked_attention, "_sdgen_not_compiled", False):
        excluded = torch.compiler.disable(attention.blocked_attention)
        excluded._sdgen_not_compiled = True
        attention.blocked_attention = excluded


def _compile_with_fallback(module: torch.nn.Module, name: str) -> None:
    """`module.compile()`, timing the first call of each new shape; on a compile error, uncompiled."""
    module.compile()
    compiled_call = module._compiled_call_impl
    seen: set[tuple] = set()

    def call(*args, **kwargs):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if shapes in seen:
            return compiled_call(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = compiled_call(*args, **kwargs)
        except Exception as exc:  # inductor/dynamo failures vary; the run goes on uncompiled
            logger.warning("--compile: compiling the %s failed (%s); running it uncompiled",
                           name, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)
        seen.add(shapes)
        logger.info("--compile: %s ready for inputs %s in %.1f s", name, shapes, time.perf_counter() - start)
        return out

    module._compiled_call_impl = call
