"""`python -m tools.gpu_check` on a machine without CUDA: it runs end to end, skips every GPU part
with its reason in one line, runs the GPU tests (which skip) and writes one JSON record."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tools import gpu_check
from tools.bench.__main__ import build_parser, command_module


@pytest.fixture
def no_cuda(monkeypatch):
    """This process and its children see no CUDA device, whatever the machine has."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_the_check_runs_end_to_end_and_skips_the_gpu_parts(no_cuda, tmp_path, capsys, monkeypatch):
    out = tmp_path / "check.json"
    monkeypatch.setattr(gpu_check, "TESTS_LIMIT_S", 900)  # a busy CPU machine: the child pytest's imports alone
    assert gpu_check.main(["--json", str(out), "--deadline_s", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"gpu_check: no CUDA device (torch {torch.__version__} sees none): the GPU parts are "
                        "skipped, the GPU tests run and skip")
    assert re.fullmatch(r"tests: passed \(6 skipped\) in \d+ s", lines[1])
    gpu_parts = ["sd15-fp16-512-sdpa", "sd15-fp16-512-channels-last", "sd15-fp16-512-channels-last-compile",
                 "sdxl-fp16-1024"]
    assert lines[2:] == [f"{name}: skipped (no CUDA device here)" for name in gpu_parts] + [f"gpu_check: wrote {out}"]

    record = json.loads(out.read_text())
    assert record["cuda"] == {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": False}
    assert [(p["name"], p["status"]) for p in record["parts"]] == [("tests", "passed")] + [
        (name, "skipped") for name in gpu_parts]
    tests = record["parts"][0]["figures"]
    assert tests["counts"] == {"passed": 0, "failed": 0, "skipped": 6} and tests["failed"] == []
    assert tests["skip_reasons"] == ["GPU test; no CUDA device here (python -m tools.gpu_check runs them on one)"]
    assert record["machine"]["cpu"]


def test_a_part_without_time_left_is_skipped_and_says_so(no_cuda, capsys):
    record = gpu_check.check(deadline_s=0)
    assert [(p["name"], p["status"], p["reason"]) for p in record["parts"]][0] == (
        "tests", "skipped", "no time left (0 s of the check's 0 s)")
    assert capsys.readouterr().out.splitlines()[1] == "tests: skipped (no time left (0 s of the check's 0 s))"


def test_the_benchmark_command_lines_are_accepted_by_the_bench():
    """The SD 1.5 parts' command lines parse and pass the bench's own checks (a GPU is the first
    place they run, so a typo must show here); an SDXL bench that lacks a command or option is a
    skip with the bench's own message."""
    for part in gpu_check.parts():
        if part.argv[:2] != ["tools.bench", "pipeline"]:
            continue
        assert gpu_check.bench_refuses(part.argv[1:]) is None, part.name
        parser, _ = build_parser("pipeline")
        args = parser.parse_args([*part.argv[1:], "--json", "x.json"])
        assert command_module("pipeline").check_arguments(args) is None
        assert (args.device, args.dtype, args.size) == ("cuda", "fp16", 512)
    assert gpu_check.bench_refuses(["no-such-bench"]) == "this version has no `python -m tools.bench no-such-bench`"
    assert gpu_check.bench_refuses(["pipeline", "--no_such_option"]) == (
        "`python -m tools.bench pipeline` here: python -m tools.bench: error: unrecognized arguments: --no_such_option")
