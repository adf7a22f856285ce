"""Every bad input of docs/errors.md, run through the command: exit status, the one line, no file.

The table in docs/errors.md is the test's data: each row's arguments are run after
`--ckpt MODEL --outdir OUT --steps 2 --W 64 --H 64`, in-process; a row with a FIFO runs in a
real process with a timeout (rows with CASES/fifo: the checkpoint is a FIFO, which would block whoever
opens it, so the row's mistake is proven to be reported before any model file opens). `CASES` is a folder of bad
files made here; `<x*N>` stands for N copies of x and `<ESC>` for the escape character.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import gen_img
from library.images import output_files
from tests.helpers import ROOT

DOC = ROOT / "docs" / "errors.md"
BASE = ["--steps", "2", "--W", "64", "--H", "64"]
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`(.+?)`\s*\|\s*(\d)\s*\|\s*`(.+)`\s*\|\s*$")
_REPEAT = re.compile(r"<(.+?)\*(\d+)>")


def table_rows() -> list[tuple[str, str, int, str]]:
    """(number, arguments, exit status, message) of each row of the docs table."""
    rows = [_ROW.match(line) for line in DOC.read_text(encoding="utf-8").splitlines()]
    return [(m.group(1), m.group(2).replace("\\|", "|"), int(m.group(3)), m.group(4)) for m in rows if m]


def expand(text: str, cases: Path, model: Path) -> str:
    """Placeholders of the table -> real text."""
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    return text.replace("<ESC>", "\x1b").replace("CASES", str(cases)).replace("MODEL", str(model))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cases(tiny_models, tmp_path_factory) -> Path:
    """The bad files of the table."""
    folder = tmp_path_factory.mktemp("cases")
    os.mkfifo(folder / "fifo")
    (folder / "notpy.py").write_text("this is not python {\n")
    (folder / "empty.txt").write_text("# only a comment\n\n")
    (folder / "allbad.txt").write_text("a --w 12\nb --d 1,\n")
    (folder / "afile").write_text("not a folder")
    Image.new("L", (10000, 10000)).save(folder / "huge.png")  # ~100 KB, 100 Mpx if decoded
    Image.new("RGB", (64, 64)).save(folder / "small.png")
    torch.save({"x": _Evil(str(folder / "pwned"))}, folder / "evil.ckpt")
    (folder / "garbage.ckpt").write_bytes(b"\x00garbage" * 100)
    torch.save({"a": torch.zeros(3)}, folder / "good.ckpt")
    data = (folder / "good.ckpt").read_bytes()
    (folder / "damaged.ckpt").write_bytes(data[: len(data) // 2])
    unsafe = shutil.copytree(tiny_models["sd1-diffusers"], folder / "unsafe")
    for weights in (unsafe / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    torch.save({"x": _Evil(str(folder / "pwned"))}, unsafe / "text_encoder" / "pytorch_model.bin")
    clip_evil = shutil.copytree(tiny_models["clip"], folder / "clipevil")  # the CLIP guidance model's paths
    for weights in clip_evil.glob("*.safetensors"):
        weights.unlink()
    torch.save({"x": _Evil(str(folder / "pwned"))}, clip_evil / "pytorch_model.bin")
    clip = tiny_models["clip-file"].read_bytes()
    (folder / "damaged.safetensors").write_bytes(clip[: len(clip) // 2])
    (folder / "hugeheader.safetensors").write_bytes((2**62).to_bytes(8, "little") + b'{"a": 1}')
    noweights = shutil.copytree(tiny_models["sd1-diffusers"], folder / "noweights")
    for weights in (noweights / "unet").glob("*.safetensors"):
        weights.unlink()
    return folder


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = gen_img.main(argv)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert len([line for line in err.splitlines() if "error:" in line]) <= 1
    last = (err.strip() or out.strip()).splitlines()[-1]
    return code, last


def _run_process(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "gen_img.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in done.stderr
    return done.returncode, done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("number,arguments,status,message", table_rows(), ids=lambda v: str(v)[:40])
def test_every_bad_input_of_the_table(tiny_models, cases, tmp_path, capsys, monkeypatch,
                                      number, arguments, status, message):
    monkeypatch.chdir(tmp_path)  # `--outdir ""` must not write here either
    out = tmp_path / "out"
    argv = ["--ckpt", str(tiny_models["sd1"]), "--outdir", str(out), *BASE,
            *shlex.split(expand(arguments, cases, tiny_models["sd1"]))]
    code, last = _run_process(argv) if "fifo" in arguments else _run_in_process(argv, capsys)
    assert (code, last) == (status, expand(message, cases, tiny_models["sd1"]))
    assert not out.exists() or not any(out.iterdir())
    assert {p.name for p in tmp_path.iterdir()} <= {"out"}
    assert not (cases / "pwned").exists()


def test_the_table_covers_the_issue():
    assert len(table_rows()) >= 40
    numbers = [int(row[0]) for row in table_rows()]
    assert numbers == list(range(1, len(numbers) + 1))


def test_a_partly_skipped_file_exits_3_and_counts_the_skipped_line(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a --w 12\nb\n")
    code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), *BASE,
                         "--from_file", str(prompts)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 3 and len(list((tmp_path / "out").iterdir())) == 1
    assert re.fullmatch(r"1 image written in \d+\.\d s, \d+\.\d\d s/it; 1 prompt line skipped \(first: "
                        + re.escape(f'{prompts}:1: prompt option --w expects a positive multiple of 8, got "12" '
                                    "(e.g. --w 768))"), last), last


def test_disk_full_names_the_file_and_leaves_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_files, "_encode", full)
    out = tmp_path / "out"
    code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(out), *BASE,
                         "--prompt", "x --d 5", "--sequential_file_name"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"gen_img.py: error: --outdir {out}: disk full while writing im_000001.png; free some space "
        "(nothing partial was left)"
    )
    assert list(out.iterdir()) == []


def test_nan_in_the_latents_saves_no_black_image(tiny_models, tmp_path, capsys, monkeypatch):
    """A NaN that is no input's fault (here: the U-Net's output at the 3rd step) stops the run."""
    from library.sampling import pipeline

    real = pipeline.Pipeline._denoise
    calls = []

    def poisoned(self, batch, guidance, latents, step_kwargs):
        unet = self.unet
        forward = unet.forward

        def nan_at_third(*args, **kwargs):
            calls.append(1)
            result = forward(*args, **kwargs)
            if len(calls) == 3:
                result.sample.fill_(float("nan"))
            return result

        monkeypatch.setattr(unet, "forward", nan_at_third)
        return real(self, batch, guidance, latents, step_kwargs)

    monkeypatch.setattr(pipeline.Pipeline, "_denoise", poisoned)
    out = tmp_path / "out"
    code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(out), "--steps", "4", "--W", "64",
                         "--H", "64", "--prompt", "x"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "gen_img.py: error: the latents became NaN/infinite at step 3 of 4; no image saved for this batch; "
        "lower the guidance scale or prompt weights, or compute in fp32 (no --fp16/--bf16)"
    )
    assert not out.exists() or list(out.iterdir()) == []
