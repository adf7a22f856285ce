"""The end of a gen_img process (`library.startup`): the fast exit keeps the exit status, the
output, the threads' work and the exit handlers, and skips only the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import pngs

ROOT = Path(__file__).resolve().parent.parent


# --- the end of the process ---------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("status", [0, 3])
def test_the_fast_exit_keeps_the_status_output_threads_and_later_handlers(tmp_path, status) -> None:
    done = tmp_path / "thread-done"
    code = f"""
import atexit, sys, threading, time
from library import startup
class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)
kept = Teardown()  # a module global: freed only by the interpreter's teardown
atexit.register(lambda: print("handler ran"))
def late():
    time.sleep(0.3)
    open({str(done)!r}, "w").write("yes")
threading.Thread(target=late).start()
print("output", end="")
startup.exit_without_teardown({status})
"""
    fast = _python(code)
    assert fast.returncode == status
    assert fast.stdout.splitlines() == ["outputhandler ran"]  # flushed; no teardown
    assert done.read_text() == "yes"  # a non-daemon thread still finished first
    plain = _python(code.replace(f"startup.exit_without_teardown({status})", f"sys.exit({status})"))
    assert plain.returncode == status and plain.stdout.splitlines() == ["outputhandler ran", "teardown ran"]


def test_gen_img_as_a_process_writes_everything_and_exits_with_its_status(tiny_models, tmp_path) -> None:
    log = tmp_path / "run.log"
    command = [sys.executable, str(ROOT / "gen_img.py"), "--ckpt", str(tiny_models["sd1"]), "--outdir",
               str(tmp_path / "out"), "--prompt", "a cat", "--W", "64", "--H", "64", "--steps", "2",
               "--console_log_file", str(log)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("1 image written in ")
    assert "images 1/1" in log.read_text().splitlines()[-1]
    assert len(pngs(tmp_path / "out")) == 1
    bad = subprocess.run([*command[:-2], "--W", "63"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--W 63: must be a positive multiple of 8" in bad.stderr
