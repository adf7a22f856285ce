"""Ctrl+C ends a run within a second or two at any size, with status 130, one `interrupted`
line and only complete image files, however many times it is pressed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(os.name == "nt", reason="sends SIGINT to a child process")


def _start_large_run(tiny_models, outdir: Path) -> subprocess.Popen:
    """gen_img.py at 2048x2048 on the tiny model, returned once the model has loaded and it denoises."""
    child = subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "gen_img.py"), "--ckpt", str(tiny_models["sd1"]), "--outdir",
         str(outdir), "--W", "2048", "--H", "2048", "--steps", "2", "--prompt", "a cat", "--images_per_prompt", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.perf_counter() + 180
    for line in child.stderr:
        if "model tiny-sd1.safetensors" in line:
            break
        assert time.perf_counter() < deadline
    time.sleep(2)  # inside the first batch: big torch calls that hold Python's own Ctrl+C back
    assert child.poll() is None
    return child


def _outcome(child: subprocess.Popen, sent: float) -> tuple[int, float, list[str]]:
    status = child.wait(timeout=60)
    seconds = time.perf_counter() - sent
    return status, seconds, child.stderr.read().strip().splitlines()


def _only_complete_images(outdir: Path) -> None:
    from PIL import Image

    for path in outdir.iterdir() if outdir.exists() else ():
        assert not path.name.endswith(".part"), path.name
        with Image.open(path) as image:
            image.verify()


def test_ctrl_c_at_2048_ends_within_2_s(tiny_models, tmp_path):
    child = _start_large_run(tiny_models, tmp_path / "out")
    sent = time.perf_counter()
    child.send_signal(signal.SIGINT)
    status, seconds, err = _outcome(child, sent)
    assert status == 130
    assert seconds < 2, f"{seconds:.1f} s"
    assert err[-1] == "interrupted" and err.count("interrupted") == 1
    assert not any("Traceback" in line for line in err)
    _only_complete_images(tmp_path / "out")


def test_many_ctrl_c_end_with_one_line(tiny_models, tmp_path):
    child = _start_large_run(tiny_models, tmp_path / "out")
    sent = time.perf_counter()
    for _ in range(5):
        child.send_signal(signal.SIGINT)
        time.sleep(0.05)
    status, seconds, err = _outcome(child, sent)
    assert status == 130
    assert seconds < 2, f"{seconds:.1f} s"
    assert err.count("interrupted") == 1 and err[-1] == "interrupted"
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err)
    _only_complete_images(tmp_path / "out")
