"""U-Net call time with our attention processor vs diffusers' default, interleaved, plus per-op profiles.

    python -m tools.bench unet --dtype bf16 --size 512 [--calls 5] [--profile] [--json PATH]
        [--batch_size 1] [--ckpt FILE | --cache_dir DIR] [--channels_last]

Loads the model with `load_model` (which sets our processor for the run, `library.models.attention`),
then calls the U-Net the way one guided step does (2 x batch rows, random inputs), alternating
"ours" and "diffusers" (`AttnProcessor2_0`, diffusers' default on PyTorch 2) call by call, so
a change in machine speed weighs on both alike. Reports per side the median, minimum and
spread of the calls and the ratio ours / diffusers of the medians and of the minima. With
`--profile`, one call each under `torch.profiler` gives the table of operators by self CPU
time (docs/measurements.md shows them). Other processes on the machine slow both sides; the
minimum is the better estimate of the uncontended speed, the median of a typical call. With
`--threads 1 --clock cpu` each call is timed by the CPU time of the one computing thread,
which other processes barely change (they still share caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tools.bench.common import (
    DTYPES,
    add_checkpoint_options,
    alternating,
    checkpoint_path,
    flop_mapping,
    machine_info,
    random_unet_inputs,
    timed,
)

logger = logging.getLogger(__name__)


def unet_call(unet: torch.nn.Module, rows: int, side: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A function making one U-Net call on fixed random inputs (one guided step's shapes)."""
    sample, context = random_unet_inputs(unet, rows, side, dtype)
    t = torch.tensor(500)
    if next(unet.parameters()).is_contiguous(memory_format=torch.channels_last) and unet.conv_in.weight.ndim == 4:
        sample = sample.contiguous(memory_format=torch.channels_last)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=context).sample

    return call


def profile_table(call: Callable[[], object], rows: int = 14) -> str:
    """Operators of one call by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# profiler operator (time including its children) -> the FLOP counter's operators of that class
KERNEL_CLASSES = {
    "convolutions": ("aten::conv2d", ("convolution",)),
    "linear layers": ("aten::linear", ("addmm", "mm")),
    "attention (SDPA)": ("aten::scaled_dot_product_attention", ("_scaled_dot_product_flash_attention_for_cpu",)),
}


def kernel_rates(unet: torch.nn.Module, call: Callable[[], object]) -> list[dict]:
    """Where one call's time goes, by kernel class, with each class's FLOP rate (GFLOP/s).

    FLOPs from `torch.utils.flop_counter` (the CPU flash-attention kernel counted as Q K^T plus
    P V), times from one profiled call (each class's top operator, children included); "other"
    is the rest of the call (normalisations, activations, additions, copies), FLOPs not counted.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        call()
    flops = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    rows, counted_us = [], 0.0
    for name, (top, ops) in KERNEL_CLASSES.items():
        us = sum(e.cpu_time_total for e in events if e.key == top)
        n = sum(flops.get(op, 0) for op in ops)
        counted_us += us
        rows.append({"class": name, "s": us / 1e6, "share": us / total_us, "gflops": n / 1e9,
                     "gflop_per_s": n / 1e3 / us if us else 0.0})
    rows.append({"class": "other", "s": (total_us - counted_us) / 1e6, "share": 1 - counted_us / total_us,
                 "gflops": 0.0, "gflop_per_s": 0.0})
    return rows


def kernel_peaks(dtype: torch.dtype) -> dict[str, float]:
    """This machine's measured GFLOP/s at the current thread count, best of 3: a 2048^3 matrix
    product ("matmul"), the U-Net's level-0 3x3 convolution (320 channels, 64x64, 2 rows), the
    two products of exact attention at 512x512's level 0 as separate batched products (2 rows
    x 8 heads, 4096 tokens, head dim 40), and the most common linear layer shape there (8192
    rows, 320 -> 2560, the feed-forward's first product)."""
    randn = lambda *shape: torch.randn(*shape).to(dtype)  # noqa: E731
    a, b = randn(2048, 2048), randn(2048, 2048)
    x, w = randn(2, 320, 64, 64), randn(320, 320, 3, 3)
    q, k_t, probs = randn(16, 4096, 40), randn(16, 40, 4096), randn(16, 4096, 4096)
    rows, weight = randn(8192, 320), randn(2560, 320)
    attention_product = 2 * 16 * 4096 * 4096 * 40
    cases = {"matmul": (lambda: a @ b, 2 * 2048**3),
             "conv3x3": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 2 * 320 * 320 * 9 * 64 * 64),
             "attention Q K^T (bmm)": (lambda: torch.bmm(q, k_t), attention_product),
             "attention P V (bmm)": (lambda: torch.bmm(probs, q), attention_product),
             "linear 8192x320->2560": (lambda: torch.nn.functional.linear(rows, weight), 2 * 8192 * 320 * 2560)}
    peaks = {}
    with torch.no_grad():
        for name, (op, n) in cases.items():
            op()
            best = min(timed(op) for _ in range(3))
            peaks[name] = n / best / 1e9
    return peaks


def rates_table(rows: list[dict], peaks: dict[str, float]) -> str:
    """The `kernel_rates` rows as text, with the rates against the measured matmul peak."""
    lines = [f"{'class':18} {'time':>8} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} {'of matmul peak':>14}"]
    for r in rows:
        rate = f"{r['gflop_per_s']:8.1f} {r['gflop_per_s'] / peaks['matmul']:13.0%}" if r["gflops"] else f"{'':>23}"
        lines.append(f"{r['class']:18} {r['s']:7.3f}s {r['share']:6.1%} {r['gflops']:8.1f} {rate}")
    lines.append("peaks: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    """Interleaved calls (and profiles); the JSON-ready result."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.models import load_model

    dtype = DTYPES[args.dtype]
    path = checkpoint_path(args.ckpt, args.cache_dir)
    model = load_model(str(path), dtype=dtype, attention=args.attention)
    unet = model.unet
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    ours = unet.attn_processors
    processors = {"ours": lambda: dict(ours), "diffusers": AttnProcessor2_0}  # set_attn_processor pops a dict
    call = unet_call(unet, 2 * args.batch_size, args.size // 8, dtype)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    outputs = {}
    for side in times:  # warm-up, and the outputs to compare
        unet.set_attn_processor(processors[side]())
        outputs[side] = call().float()
    for i, side in alternating(times, args.calls):
        unet.set_attn_processor(processors[side]())
        times[side].append(timed(call, clock))
        logger.info("call %d %s: %.3f s", i + 1, side, times[side][-1])
    result = {
        "config": vars(args) | {"checkpoint": str(path)},
        "machine": machine_info(),
        "calls_s": times,
        "median_s": {side: statistics.median(ts) for side, ts in times.items()},
        "min_s": {side: min(ts) for side, ts in times.items()},
        "output_max_abs_diff": float((outputs["ours"] - outputs["diffusers"]).abs().max()),
        "output_scale": float(outputs["diffusers"].abs().max()),
    }
    result["ratio_median"] = result["median_s"]["ours"] / result["median_s"]["diffusers"]
    result["ratio_min"] = result["min_s"]["ours"] / result["min_s"]["diffusers"]
    if getattr(args, "rates", False):  # of diffusers' side: SDPA, the exact attention both sides use in fp32
        unet.set_attn_processor(processors["diffusers"]())
        result["kernel_rates"] = kernel_rates(unet, call)
        result["kernel_peaks"] = kernel_peaks(dtype)
    if args.profile:
        result["profiles"] = {}
        for side in times:
            unet.set_attn_processor(processors[side]())
            result["profiles"][side] = profile_table(call)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per side (default 5)")
    parser.add_argument("--attention", default="auto", help="our processor: auto, blocked or sdpa (default auto)")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time (with --threads 1: robust against other busy processes)")
    parser.add_argument("--profile", action="store_true", help="also profile one call per side")
    parser.add_argument("--rates", action="store_true",
                        help="also time one call by kernel class with its GFLOP/s, and this machine's kernel peaks")
    add_checkpoint_options(parser)
    parser.add_argument("--json")


def check_arguments(args: argparse.Namespace) -> str | None:
    """Why these option values cannot run, or None."""
    if args.clock == "cpu" and args.threads != 1:
        return "--clock cpu measures one thread: give --threads 1"
    return None


def command(args: argparse.Namespace) -> int:
    """Run, print the summary (and kernel rates, profiles)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    for side in ("ours", "diffusers"):
        ts = result["calls_s"][side]
        logger.info("%-9s median %.3f s, min %.3f s, spread %.3f-%.3f s", side, statistics.median(ts), min(ts),
                    min(ts), max(ts))
    logger.info("ours / diffusers: %.3f (medians), %.3f (minima); outputs differ by at most %.3g (scale %.3g)",
                result["ratio_median"], result["ratio_min"], result["output_max_abs_diff"], result["output_scale"])
    if "kernel_rates" in result:
        print(rates_table(result["kernel_rates"], result["kernel_peaks"]))
    for side, table in result.get("profiles", {}).items():
        print(f"--- {side} ---\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
