"""Seconds of one U-Net call with and without Deep Shrink (depth 1, ratio 0.5, a gated step).

    python -m tools.bench deep-shrink [--ckpt FILE] [--sizes 512 768] [--repeats 2] [--dtype bf16]

Without `--ckpt` it uses the full-size SD 1.5-shaped random checkpoint shared by the
benchmarks (`tools.bench.common`, written on first use). Calls are interleaved (off, on, off,
on, ...); each line prints every repetition, so the first (warm-up) can be told apart. One image with CFG (2 rows).
"""

from __future__ import annotations

import argparse
import time

import torch

from library.features.deep_shrink import ShrinkDeepLayers
from library.models import load_model
from library.records.deep_shrink_settings import DeepShrink
from library.sampling.patches import Batch, BatchLayout, FixedFeature, PatchOwner
from library.text.encoder import Conditioning
from tools.bench.common import DEFAULT_CACHE, DTYPES, checkpoint_path


def call_seconds(unet: torch.nn.Module, pixels: int, shrink: bool, dtype: torch.dtype) -> float:
    """One U-Net call at t=900 on a (2, 4, pixels/8, pixels/8) input."""
    latent = pixels // 8
    x = torch.randn(2, 4, latent, latent, dtype=dtype)
    text = Conditioning(torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype))
    features = [FixedFeature(ShrinkDeepLayers(DeepShrink(1, 650)))] if shrink else []
    batch = Batch((), BatchLayout(1, 2, latent, latent), None, torch.tensor([900]), torch.device("cpu"), dtype)
    t = torch.tensor(900)
    with torch.no_grad(), PatchOwner(unet, features).installed(batch) as run:
        start = time.perf_counter()
        run.unet_call(run.context(0, t), x, t, text)
        return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--ckpt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


def command(args: argparse.Namespace) -> int:
    """Time off / on calls at each size; one line per size."""
    unet = load_model(str(checkpoint_path(args.ckpt, DEFAULT_CACHE)), dtype=DTYPES[args.dtype]).unet
    for pixels in args.sizes:
        times: dict[str, list[float]] = {"off": [], "deep_shrink": []}
        for _ in range(args.repeats):
            times["off"].append(call_seconds(unet, pixels, False, DTYPES[args.dtype]))
            times["deep_shrink"].append(call_seconds(unet, pixels, True, DTYPES[args.dtype]))
        print(pixels, {k: [round(v, 2) for v in vs] for k, vs in times.items()}, flush=True)
    return 0

