"""The end of a gen_img process (`library.run.process_exit`): the fast exit keeps the exit status, the
output, the threads' work and the exit handlers, and skips only the interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, pngs

# --- the end of the process ---------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("status", [0, 3])
def test_the_fast_exit_keeps_the_status_output_threads_and_later_handlers(tmp_path, status) -> None:
    done = tmp_path / "thread-done"
    code = f"""
import atexit, sys, threading, time
from library.run import process_exit as startup
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


# --- what a run imports before its inputs are checked ---------------------------------------------


@pytest.mark.parametrize("argv, error", [
    (["--ckpt", "missing.safetensors", "--prompt", "a cat"],
     "gen_img.py: error: --ckpt missing.safetensors: no such file or folder"),
    (["--ckpt", "missing.safetensors", "--prompt", "a cat", "--sampler", "euler_a", "--gradual_latent_timesteps", "650",
      "--gradual_latent_unsharp_params", "2,1,1", "--ds_depth_1", "3"],
     'gen_img.py: error: --gradual_latent_unsharp_params "2,1,1": ksize must be an odd whole number from 1 to 31 '
     '(e.g. --gradual_latent_unsharp_params "3,0.5,0.5,1") (see --help)'),
    (["--ckpt", "missing.safetensors", "--from_file", "missing-prompts.txt"],
     "gen_img.py: error: --from_file missing-prompts.txt: cannot read it (No such file or directory)"),
])
def test_bad_input_is_reported_before_torch_is_imported(tmp_path, argv, error) -> None:
    """Options, Deep Shrink / Gradual Latent settings, prompt files and input paths are checked
    without torch, diffusers or transformers (several seconds of imports): the one error line
    comes in a fraction of a second."""
    code = f"""
import sys
import gen_img
try:
    status = gen_img.main({argv!r})
except SystemExit as exc:
    status = exc.code
print("status", status, "loaded", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip().splitlines()[-1] == "status 2 loaded []"
    assert done.stderr.strip() == error
