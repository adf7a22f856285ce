"""Whole-process figures of `gen_img.py`: start-up overhead, first-image latency, peak RSS.

    python -m tools.bench process [--dtype fp32|bf16|fp16] [--size 256] [--steps 8] [--runs 3]
        [--ckpt FILE | --cache_dir DIR] [--json PATH] [-- extra gen_img options]

Each run is a fresh `python gen_img.py --ckpt ... --prompt ... --W/--H size --steps N
--sampler ddim` process (one image) with the file already in the page cache. Per run:

* whole: process start to exit (wall clock);
* generating: the "N image(s) written in X s" of gen_img's summary (prompt to saved image);
* overhead: whole - generating (imports, argument parsing, model load, hashing, exit);
* first image: process start until the first PNG exists in the output folder;
* peak RSS: the child's maximum resident set (`wait4` rusage), the whole process's peak.

Medians over `--runs`, with every run's values in `--json`. The model hash is remembered
between runs (`library.images.hashes`); `--cold_hash` gives every run a fresh hash cache,
as a first run on a new file. `--gen_img` runs another checkout's gen_img.py (before/after).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.common import (
    ROOT,
    add_checkpoint_options,
    checkpoint_path,
    maxrss_gb,
    read_into_page_cache,
)

logger = logging.getLogger(__name__)
SUMMARY = re.compile(r"(\d+) images? written(?: by \d+ processes \([\d +]+\))? in ([\d.]+) s")


def one_run(ckpt: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    """One gen_img.py process (`args.gen_img`, default this checkout's); its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-process-") as out:
        script = getattr(args, "gen_img", None) or ROOT / "gen_img.py"
        command = [sys.executable, str(script), "--ckpt", str(ckpt), "--outdir", out,
                   "--prompt", "a photograph of an astronaut riding a horse", "--W", str(args.size),
                   "--H", str(args.size), "--steps", str(args.steps), "--sampler", "ddim", "--seed", "1", *extra]
        if args.dtype != "fp32":
            command.append(f"--{args.dtype}")
        env = dict(os.environ)
        if args.cold_hash:
            env["SDGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-hash-")
        log = Path(out) / "output.txt"
        with open(log, "w") as sink:
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
            first_image = None
            while True:  # poll for the first image (10 ms resolution) and for the exit (rusage of the child)
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if first_image is None and any(Path(out).glob("*.png")):
                    first_image = time.perf_counter() - start
                time.sleep(0.01)
            whole = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
        text = log.read_text(errors="replace")
        if child.returncode != 0:
            raise RuntimeError(f"gen_img failed ({child.returncode}):\n{text[-3000:]}")
        found = SUMMARY.search(text)
        if found is None:
            raise RuntimeError(f"no summary line in gen_img's output:\n{text[-1000:]}")
        generating = float(found.group(2))
    return {"whole_s": whole, "generating_s": generating, "overhead_s": whole - generating,
            "first_image_s": first_image if first_image is not None else whole,
            "peak_rss_gb": maxrss_gb(usage.ru_maxrss)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold_hash", action="store_true", help="a fresh model-hash cache for every run")
    add_checkpoint_options(parser)
    parser.add_argument("--gen_img", help="the gen_img.py to run, e.g. an older checkout's (default this one)")
    parser.add_argument("--json")
    parser.add_argument("extra", nargs="*", help="more gen_img options (after --)")


def command(args: argparse.Namespace) -> int:
    """Run, print medians, write the JSON."""
    ckpt = checkpoint_path(args.ckpt, args.cache_dir)
    read_into_page_cache(ckpt)
    runs = []
    for i in range(args.runs):
        runs.append(one_run(ckpt, args, args.extra))
        logger.info("run %d: %s", i + 1, {k: round(v, 3) for k, v in runs[-1].items()})
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    spread = {key: (min(r[key] for r in runs), max(r[key] for r in runs)) for key in runs[0]}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"config": vars(args) | {"checkpoint": str(ckpt)}, "runs": runs, "median": medians, "spread": spread,
              "loadavg_after": load}
    for key, value in medians.items():
        print(f"{key:16} median {value:8.3f}   (min {spread[key][0]:.3f}, max {spread[key][1]:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
