"""The figures of record from one run: start-up overhead, peak RSS, U-Net calls against diffusers.

    python -m tools.bench report [--before DIR] [--runs 2] [--calls 3] [--json PATH]
        [--ckpt FILE | --cache_dir DIR]

In this order, on the full-size SD 1.5-shaped random model (the file read into the page cache
first):

* the libraries' import floor: a bare process importing torch, diffusers' U-Net, VAE and DDIM
  scheduler and transformers' CLIP text model, what any diffusers-based program pays before
  its own first line (`--runs` processes);
* whole `gen_img.py` processes (the `process` benchmark): fp32 and bf16, 256x256, 8 ddim steps,
  `--runs` each, this checkout and, with `--before`, another checkout's gen_img.py, alternating
  run by run so that a change in machine speed weighs on both; then one 512x512 run (1 step)
  per dtype and side for the 512 peaks;
* U-Net calls, ours vs diffusers' processor, interleaved (the `unet` benchmark): bf16 with the
  blocked attention of `--blocked_attention`, and fp32 (where both sides use SDPA), at 256 and
  512; then fp32 at 512 by kernel class, with each class's GFLOP/s against this machine's
  measured peaks.

Prints one Markdown table per part (docs/measurements.md shows them); `--json` keeps every run.
Wall clock with the machine's threads: run it on an otherwise idle machine (the 1-minute load
average before and after is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from tools.bench import process, unet
from tools.bench.common import (
    ROOT,
    add_checkpoint_options,
    alternating,
    checkpoint_path,
    load_average,
    machine_info,
    read_into_page_cache,
    spread,
)

logger = logging.getLogger(__name__)
LIBRARIES = ("import torch; from diffusers import UNet2DConditionModel, AutoencoderKL, DDIMScheduler; "
             "from transformers import CLIPTextModel")
PROCESS_FIGURES = ("overhead_s", "first_image_s", "whole_s", "generating_s", "peak_rss_gb")


def import_floor(runs: int) -> list[float]:
    """Seconds of whole bare processes importing what a run needs from the libraries."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", LIBRARIES], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def process_runs(ckpt: Path, sides: dict[str, Path], dtype: str, size: int, steps: int, runs: int) -> dict:
    """{side: [figures of each run]}, the sides alternating run by run."""
    result: dict[str, list[dict]] = {side: [] for side in sides}
    for _, side in alternating(sides, runs):
        options = argparse.Namespace(dtype=dtype, size=size, steps=steps, cold_hash=False, gen_img=sides[side])
        result[side].append(process.one_run(ckpt, options, []))
        logger.info("%s %s %dx%d: %s", side, dtype, size, size,
                    {k: round(v, 3) for k, v in result[side][-1].items()})
    return result


def unet_calls(ckpt: Path, dtype: str, size: int, calls: int, attention: str, rates: bool = False) -> dict:
    """The `unet` benchmark's interleaved calls (and kernel rates) for one dtype and size."""
    options = argparse.Namespace(dtype=dtype, size=size, batch_size=1, calls=calls, attention=attention,
                                 channels_last=False, threads=None, clock="wall", profile=False, rates=rates,
                                 ckpt=str(ckpt), cache_dir=None, json=None)
    result = unet.measure(options)
    logger.info("U-Net %s %d: ours %s, diffusers %s", dtype, size, result["calls_s"]["ours"],
                result["calls_s"]["diffusers"])
    return result


def process_table(report: dict) -> str:
    """Whole-process figures, one column per side."""
    sides = list(report["processes"]["fp32"])
    lines = ["| figure | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    for dtype in ("fp32", "bf16"):
        for key, label in (("overhead_s", "overhead (whole - generating)"), ("first_image_s", "first image"),
                           ("generating_s", "generating"), ("peak_rss_gb", "peak RSS")):
            unit, digits = ("GB", 3) if key == "peak_rss_gb" else ("s", 2)
            cells = [spread([r[key] for r in report["processes"][dtype][side]], unit, digits) for side in sides]
            lines.append(f"| {dtype} 256x256, {label} | " + " | ".join(cells) + " |")
    for dtype in ("fp32", "bf16"):
        cells = [spread([r["peak_rss_gb"] for r in report["peaks_512"][dtype][side]], "GB", 3) for side in sides]
        lines.append(f"| {dtype} 512x512 (1 step), peak RSS | " + " | ".join(cells) + " |")
    floor = spread(report["import_floor_s"], "s")
    lines.append(f"| libraries' import floor (bare process) | {floor} |" + " |" * (len(sides) - 1))
    return "\n".join(lines)


def unet_table(report: dict) -> str:
    """U-Net calls, ours vs diffusers' processor."""
    lines = ["| U-Net call | ours | diffusers | ours / diffusers (medians; minima) |", "|---|---:|---:|---:|"]
    for name, r in report["unet"].items():
        lines.append(f"| {name} | {spread(r['calls_s']['ours'], 's', 3)} | {spread(r['calls_s']['diffusers'], 's', 3)}"
                     f" | {r['ratio_median']:.3f}; {r['ratio_min']:.3f} |")
    return "\n".join(lines)


def report_run(args: argparse.Namespace) -> dict:
    """Every measurement, in the order of the module's docstring."""
    ckpt = checkpoint_path(args.ckpt, args.cache_dir)
    read_into_page_cache(ckpt)
    sides = {"after": ROOT / "gen_img.py"}
    if args.before:
        sides = {"before": Path(args.before) / "gen_img.py", **sides}
    report: dict = {"checkpoint": str(ckpt), "sides": {k: str(v) for k, v in sides.items()},
                    "load_average_start": load_average(), "machine": machine_info()}
    report["import_floor_s"] = import_floor(args.runs)
    report["processes"] = {d: process_runs(ckpt, sides, d, 256, 8, args.runs) for d in ("fp32", "bf16")}
    report["peaks_512"] = {d: process_runs(ckpt, sides, d, 512, 1, 1) for d in ("fp32", "bf16")}
    report["unet"] = {f"bf16 {size}x{size}, blocked attention": unet_calls(ckpt, "bf16", size, args.calls, "blocked")
                      for size in (256, 512)}
    report["unet"]["fp32 256x256 (SDPA both)"] = unet_calls(ckpt, "fp32", 256, args.calls, "auto")
    report["unet"]["fp32 512x512 (SDPA both)"] = unet_calls(ckpt, "fp32", 512, args.calls, "auto", rates=True)
    report["load_average_end"] = load_average()
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (see the module docstring)."""
    parser.add_argument("--before", help="another checkout (its gen_img.py) for the 'before' column")
    parser.add_argument("--runs", type=int, default=2, help="whole processes per side and dtype (default 2)")
    parser.add_argument("--calls", type=int, default=3, help="timed U-Net calls per side (default 3)")
    add_checkpoint_options(parser)
    parser.add_argument("--json")


def command(args: argparse.Namespace) -> int:
    """Run every measurement and print the tables (and write the JSON)."""
    report = report_run(args)
    fp32 = report["unet"]["fp32 512x512 (SDPA both)"]
    start, end = report["load_average_start"], report["load_average_end"]
    print(f"load average {start:.2f} at the start, {end:.2f} at the end\n")
    print(process_table(report), "\n")
    print(unet_table(report), "\n")
    print("fp32 512x512 U-Net call by kernel class (diffusers' processor):")
    print(unet.rates_table(fp32["kernel_rates"], fp32["kernel_peaks"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0

