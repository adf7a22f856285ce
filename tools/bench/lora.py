"""Time U-Net steps with no LoRA, a LoRA un-merged, pre-calculated and merged.

``--network_pre_calc`` is meant to run at the speed of the bare model; this checks it. It builds a
full-size SD 1.5-shaped U-Net with random weights (no download), a random rank-32 kohya LoRA
on its default targets, and times one CFG step (batch 2 at 512x512 = latents 2x4x64x64) per
mode, round-robin so drift in machine speed hits every mode alike. It reports the median
seconds per step of each mode and the ratio to no-LoRA, plus the fastest step of each
(on a shared machine, the least disturbed measurement).

Usage:  python -m tools.bench lora [--dtype fp32|bf16|fp16] [--runs 5] [--rank 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from networks.lora import create_network_from_weights
from networks.lora_files import random_kohya_state_dict
from tools.bench.common import DTYPES, SD15_UNET, synchronize

logger = logging.getLogger(__name__)

MODES = ("none", "unmerged", "precalc", "merged")


def build_unet(dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The full-size SD 1.5-shaped U-Net with random weights (seed 0), for inference."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    return unet.to(device, dtype).eval().requires_grad_(False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per mode (median taken)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def command(args: argparse.Namespace) -> int:
    """Time every mode round-robin; log (and write) the figures."""
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Build the U-Net and the LoRA, time each mode; the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    unet = build_unet(dtype, args.device)
    weights = random_kohya_state_dict(None, unet, rank=args.rank, seed=0)
    network = create_network_from_weights(1.0, None, None, None, unet, weights_sd=weights)
    logger.info("U-Net %.0fM params, LoRA rank %d on %d layers, torch threads %d",
                sum(p.numel() for p in unet.parameters()) / 1e6, args.rank, len(network.modules),
                torch.get_num_threads())

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g).to(args.device, dtype)
    context = torch.randn(2, 77, 768, generator=g).to(args.device, dtype)
    timestep = torch.tensor([500, 500], device=args.device)

    device = torch.device(args.device)

    def step() -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one U-Net call."""
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            unet(latents, timestep, context)
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu

    setup_s: dict[str, list[float]] = {mode: [] for mode in MODES}

    def enter(mode: str) -> None:
        start = time.perf_counter()
        if mode == "unmerged":
            network.apply_to()
        elif mode == "precalc":
            network.apply_to()
            network.pre_calculation()
        elif mode == "merged":
            network.merge_to()
        setup_s[mode].append(time.perf_counter() - start)

    def leave() -> None:
        network.remove()

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:  # warm-up (allocator, kernels) once per mode
        enter(mode)
        step()
        leave()
    for run in range(args.runs):
        for mode in MODES:
            enter(mode)
            wall, cpu = step()
            times[mode].append(wall)
            cpu_times[mode].append(cpu)
            leave()
        logger.info("run %d: %s", run + 1, "  ".join(f"{m} {times[m][-1]:.3f}s" for m in MODES))

    base = statistics.median(times["none"])
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "s_per_step": {m: round(statistics.median(t), 4) for m, t in times.items()},
        "ratio_to_none": {m: round(statistics.median(t) / base, 4) for m, t in times.items()},
        # per round mode / none, median over rounds: drift that lasts a round cancels out
        "paired_ratio_to_none": {
            m: round(statistics.median(x / n for x, n in zip(t, times["none"])), 4) for m, t in times.items()
        },
        # the fastest step is the least disturbed by other processes on a shared machine
        "min_s_per_step": {m: round(min(t), 4) for m, t in times.items()},
        "min_ratio_to_none": {m: round(min(t) / min(times["none"]), 4) for m, t in times.items()},
        # CPU seconds of this process: less sensitive to other processes taking the cores
        "cpu_s_per_step": {m: round(statistics.median(t), 4) for m, t in cpu_times.items()},
        "cpu_ratio_to_none": {
            m: round(statistics.median(t) / statistics.median(cpu_times["none"]), 4) for m, t in cpu_times.items()
        },
        # seconds to enter each mode (pre-calc / merge: computing and writing the weights)
        "setup_s": {m: round(statistics.median(s), 3) for m, s in setup_s.items()},
        "all_s": {m: [round(x, 4) for x in t] for m, t in times.items()},
    }
    logger.info(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result

