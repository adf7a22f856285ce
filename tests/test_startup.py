"""Start and end of a gen_img process (`library.startup`, `library.models.prefetch`): the
checkpoint read ahead gives the very weights of a plain load, and the fast exit keeps the
exit status, the output and the exit handlers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library import startup
from library.errors import UserError
from library.models import load_model, prefetch
from library.models.lazy_encoder import LazyEncoder
from tests.helpers import pixels, pngs, run

ROOT = Path(__file__).resolve().parent.parent


def _states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(model, part).state_dict() for part in ("unet", "vae", "text_encoder")}


def _same(a, b) -> bool:
    return all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) and a[p][k].dtype == b[p][k].dtype
                                                  for k in a[p]) for p in a)


@pytest.mark.parametrize("dtype, vae_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32)])
def test_a_prefetched_load_has_the_weights_of_a_plain_load(tiny_models, dtype, vae_dtype) -> None:
    path = Path(tiny_models["sd1"])
    plain = load_model(str(path), dtype=dtype, vae_dtype=vae_dtype, vae_encoder="lazy")
    assert prefetch.start(path, dtype, vae_dtype, lazy_encoder=True)
    ready = prefetch.read_cast(prefetch.Request.of(path, dtype, vae_dtype, True))
    assert {t.dtype for k, t in ready.items() if k.startswith("model.diffusion_model.")} == {dtype}
    assert {t.dtype for k, t in ready.items() if k.startswith("first_stage_model.decoder.")} == {vae_dtype}
    assert {t.dtype for k, t in ready.items() if k.startswith("first_stage_model.encoder.")} == {torch.float32}
    fast = load_model(str(path), dtype=dtype, vae_dtype=vae_dtype, vae_encoder="lazy")
    assert prefetch.take(path, dtype, vae_dtype, True) is None  # used up by the load
    assert isinstance(fast.vae.encoder, LazyEncoder)
    assert _same(_states(plain), _states(fast))


def test_only_an_equal_request_uses_it(tiny_models, monkeypatch) -> None:
    path = Path(tiny_models["sd1"])
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    assert prefetch.take(path, torch.bfloat16, torch.bfloat16, True) is None
    assert prefetch.take(path, torch.float32, torch.float32, True) is None  # the slot was emptied
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    assert prefetch.take(path, torch.float32, torch.float32, False) is None  # an eager encoder is another load
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    state = prefetch.take(path, torch.float32, torch.float32, True)
    assert state is not None and state.keys() == load_file(str(path)).keys()
    assert not prefetch.start(Path(tiny_models["sd1-diffusers"]), torch.float32, torch.float32, True)


def test_a_changed_file_is_read_again(tiny_models, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(Path(tiny_models["sd1"]).read_bytes())
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    os.utime(path, ns=(1, 1))  # same bytes, another modification time
    assert prefetch.take(path, torch.float32, torch.float32, True) is None


def test_a_damaged_file_fails_in_the_load_as_before(tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(str(path), vae_encoder="lazy")


def test_the_last_sd2_text_block_is_left_as_stored(tiny_models) -> None:
    path = Path(tiny_models["sd2"])
    ready = prefetch.read_cast(prefetch.Request.of(path, torch.bfloat16, torch.bfloat16, True))
    blocks = sorted({int(k.split("resblocks.")[1].split(".")[0]) for k in ready if "resblocks." in k})
    last = f"cond_stage_model.model.transformer.resblocks.{blocks[-1]}."
    assert {t.dtype for k, t in ready.items() if k.startswith(last)} == {torch.float32}
    first = "cond_stage_model.model.transformer.resblocks.0."
    assert {t.dtype for k, t in ready.items() if k.startswith(first)} == {torch.bfloat16}


def test_a_run_uses_the_prefetch_and_its_images_do_not_change(tiny_models, tmp_path, monkeypatch) -> None:
    used: list[bool] = []
    real_take = prefetch.take

    def spying(*args, **kwargs):
        state = real_take(*args, **kwargs)
        used.append(state is not None)
        return state

    monkeypatch.setattr(prefetch, "take", spying)
    common = ["--prompt", "a house --d 7", "--bf16"]
    assert run(tiny_models, tmp_path / "ahead", *common) == 0
    monkeypatch.setattr(startup, "prefetch_checkpoint", lambda options: False)
    assert run(tiny_models, tmp_path / "plain", *common) == 0
    assert used == [True, False]
    (a,), (b,) = pngs(tmp_path / "ahead"), pngs(tmp_path / "plain")
    assert np.array_equal(pixels(a), pixels(b))


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
