"""`python -m tools.gpu_check [--json gpu_check.json]`: the prepared check for a lent CUDA GPU.

One command, under 8 minutes on one GPU, one JSON file. Its parts:

1. `tests`: `pytest -m gpu` over the GPU test files (`tests/run/test_gpu.py`: fp16 and bf16
   generation against the CPU's fp32 image, the fp16 VAE's NaN guard, torchrun with one GPU);
   the outcome counts and the names of failed tests.
2. `sd15-fp16-512-*`: `python -m tools.bench pipeline` at fp16, 512x512, on the full-size SD
   1.5-shaped random model (written once into the bench cache), our pipeline against diffusers'
   `StableDiffusionPipeline` built from the same modules, in three variants: PyTorch SDPA,
   SDPA + channels-last, channels-last + `--compile`.
3. `sdxl-fp16-1024`: `python -m tools.bench sdxl` at 1024x1024 when this version has an SDXL
   benchmark that accepts `--device cuda`; skipped with the reason otherwise.

Each part runs in a process of its own with a time limit (its own, and never past the check's
deadline), so a part that fails or hangs costs only its share. The JSON holds the machine, and
for each part its status (passed / failed / skipped / timed out), the reason, the seconds, the
command and its figures (the bench's whole JSON record). Without CUDA every GPU part is skipped
with one line saying so; the tests part still runs (its tests skip), so the check runs end to end
anywhere. It needs nothing beyond requirements.txt and requirements-dev.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPU_TEST_FILES = ("tests/run/test_gpu.py",)
DEADLINE_S = 470  # the whole check: 7 min 50 s
MIN_PART_S = 30  # a part that would get less is skipped ("no time left")
TESTS_LIMIT_S = 130  # the GPU tests part (tiny models: about a minute on a GPU machine)
BENCH = ["--device", "cuda", "--dtype", "fp16", "--size", "512", "--steps", "20", "--runs", "2", "--load_runs", "1"]


@dataclass
class Part:
    """One part of the check: a command run in a child process, with its own time limit."""

    name: str
    argv: list[str]  # after `python -m`
    limit_s: int
    needs_cuda: bool = True
    json_flag: str | None = "--json"  # the option that makes the command write its figures
    status: str = "not run"
    reason: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 1),
                "command": "python -m " + " ".join(self.argv), "figures": self.figures}

    def line(self) -> str:
        """The part's one line on stdout."""
        text = f"{self.name}: {self.status}"
        if self.reason:
            text += f" ({self.reason})"
        return text + (f" in {self.seconds:.0f} s" if self.seconds else "")


def parts() -> list[Part]:
    """The check's parts, in the order they run."""
    tests = Part("tests", ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES], TESTS_LIMIT_S,
                 needs_cuda=False, json_flag=None)
    bench = ["tools.bench", "pipeline", *BENCH]
    return [
        tests,
        Part("sd15-fp16-512-sdpa", bench, 130),  # writes the full-size random model first (~2 GB)
        Part("sd15-fp16-512-channels-last", [*bench, "--channels_last"], 70),
        Part("sd15-fp16-512-channels-last-compile", [*bench, "--channels_last", "--compile"], 160),
        Part("sdxl-fp16-1024", ["tools.bench", "sdxl", "--device", "cuda", "--dtype", "fp16", "--sizes", "1024",
                                "--steps", "10", "--rounds", "2"], 150),
    ]


def cuda_state() -> dict[str, Any]:
    """What torch says about CUDA here."""
    import torch

    state: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                             "available": torch.cuda.is_available()}
    if state["available"]:
        props = torch.cuda.get_device_properties(0)
        state |= {"devices": torch.cuda.device_count(), "name": props.name,
                  "memory_gb": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    return state


def unavailable(part: Part, cuda: bool) -> str | None:
    """Why `part` cannot run here, or None."""
    if part.needs_cuda and not cuda:
        return "no CUDA device here"
    if part.argv[:2] == ["tools.bench", "sdxl"]:
        return bench_refuses(part.argv[1:])
    return None


def bench_refuses(argv: list[str]) -> str | None:
    """Why `python -m tools.bench` would not take `argv` in this version (no such command, an
    option it lacks), or None."""
    from tools.bench.__main__ import COMMANDS, build_parser

    if argv[0] not in COMMANDS:
        return f"this version has no `python -m tools.bench {argv[0]}`"
    parser, _ = build_parser(argv[0])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args([*argv, "--json", "x.json"])
        except SystemExit:
            return f"`python -m tools.bench {argv[0]}` here: " + err.getvalue().strip().splitlines()[-1]
    return None


def run_part(part: Part, limit_s: float, scratch: Path) -> None:
    """Run `part` in a child process for at most `limit_s`; fill in its status and figures."""
    out = scratch / f"{part.name}.json"
    argv = [sys.executable, "-m", *part.argv]
    if part.json_flag:
        argv += [part.json_flag, str(out)]
    else:
        argv += [f"--junitxml={out.with_suffix('.xml')}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        part.status, part.reason = "timed out", f"after {limit_s:.0f} s"
        part.seconds = time.perf_counter() - start
        return
    part.seconds = time.perf_counter() - start
    if part.json_flag:
        part.status = "passed" if done.returncode == 0 else "failed"
        if out.is_file():
            part.figures = json.loads(out.read_text())
    else:
        part.figures = test_outcomes(out.with_suffix(".xml"))
        counts = part.figures.get("counts", {})
        part.status = "passed" if done.returncode == 0 else "failed"
        part.reason = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        part.figures["exit_status"] = done.returncode
        part.figures["output_tail"] = tail[-20:]
        if not part.reason:
            part.reason = f"exit status {done.returncode}: {tail[-1][:160] if tail else 'no output'}"


def test_outcomes(junit: Path) -> dict[str, Any]:
    """Counts of passed / failed / skipped tests and the failed tests' names, from pytest's JUnit XML."""
    if not junit.is_file():
        return {"counts": {}, "failed": []}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skipped.append(case.find("skipped").get("message", ""))
        else:
            counts["passed"] += 1
    return {"counts": counts, "failed": failed, "skip_reasons": sorted(set(skipped))}


def check(deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    """Run every part (skipping what cannot run here); the JSON-ready record. Prints one line per part."""
    from tools.bench.common import machine_info

    started = time.perf_counter()
    cuda = cuda_state()
    if not cuda["available"]:
        print(f"gpu_check: no CUDA device (torch {cuda['torch']} sees none): the GPU parts are skipped, "
              "the GPU tests run and skip", flush=True)
    todo = parts()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for part in todo:
            left = max(0.0, deadline_s - (time.perf_counter() - started))
            reason = unavailable(part, cuda["available"])
            if reason is None and left < MIN_PART_S:
                reason = f"no time left ({left:.0f} s of the check's {deadline_s:.0f} s)"
            if reason is not None:
                part.status, part.reason = "skipped", reason
            else:
                run_part(part, min(part.limit_s, left), Path(scratch))
            print(part.line(), flush=True)
    return {"machine": machine_info(), "cuda": cuda, "seconds": round(time.perf_counter() - started, 1),
            "parts": [part.record() for part in todo]}


def main(argv: list[str] | None = None) -> int:
    """Run the check, write the JSON; 0 when no part failed or timed out."""
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where to write the record (default gpu_check.json)")
    parser.add_argument("--deadline_s", type=float, default=DEADLINE_S,
                        help=f"the whole check's time limit in seconds (default {DEADLINE_S})")
    args = parser.parse_args(argv)
    record = check(args.deadline_s)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"gpu_check: wrote {args.json}", flush=True)
    return 1 if any(p["status"] in ("failed", "timed out") for p in record["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
