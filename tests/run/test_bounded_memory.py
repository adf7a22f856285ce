"""A typo never eats the machine: `--images_per_prompt 1000000000000`, `--n_iter 1000000000`
and a 1 GB prompt file start generating at once in constant memory (Jobs are made as the
batches take them, the file is read line by line); `--batch_size 10000` is refused in one line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import gen_img
from tests.helpers import ROOT, TXT2IMG_FAST

RSS_LIMIT_KB = 1024 * 1024  # 1 GiB until the first image
FIRST_IMAGE_S = 240  # generous: the machine is shared; a run that builds 10**12 Jobs never gets there


def _until_first_image(tiny_models, outdir: Path, *extra: str) -> tuple[int, float]:
    """Run gen_img.py in a child until its first PNG appears; its peak RSS (kB) then, and the time."""
    argv = [sys.executable, str(ROOT / "gen_img.py"), "--ckpt", str(tiny_models["sd1"]), "--outdir", str(outdir),
            *TXT2IMG_FAST, "--steps", "1", *extra]
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not list(outdir.glob("im_*.png")):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.perf_counter() - start < FIRST_IMAGE_S, "no image yet"
            time.sleep(0.05)
        status = Path(f"/proc/{child.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]), time.perf_counter() - start
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_a_trillion_images_a_billion_rounds_and_a_1_gb_prompt_file_start_in_constant_memory(tiny_models, tmp_path):
    big = tmp_path / "big.txt"
    block = b"x" * (4 * 1024 * 1024 + 100) + b"\n"  # each line over the 4 MiB limit: skipped
    try:
        with big.open("wb") as f:
            f.write(b"a cat\n")
            for _ in range(1024 * 1024 * 1024 // len(block) + 1):
                f.write(block)
        assert big.stat().st_size > 1024**3
        peak, seconds = _until_first_image(tiny_models, tmp_path / "out", "--from_file", str(big),
                                           "--images_per_prompt", "1000000000000", "--n_iter", "1000000000")
    finally:
        big.unlink()
    print(f"peak RSS until the first image: {peak} kB, {seconds:.1f} s")
    assert peak < RSS_LIMIT_KB, f"peak RSS {peak} kB"


def test_a_huge_batch_size_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gen_img.main(["--ckpt", str(tmp_path / "no-model.safetensors"), "--prompt", "x", "--batch_size", "10000"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "gen_img.py: error: --batch_size 10000: must be 1 to 1024 images per batch " \
                                      "(see --help)\n"


def test_a_long_line_is_skipped_with_its_file_and_line(tmp_path):
    from library.prompts.prompt_file import MAX_LINE_BYTES, PromptFile

    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\n# comment\n\n" + b"y" * (MAX_LINE_BYTES + 1) + b"\r\nlast --d 2\r\n")
    lines = PromptFile(str(path))
    assert len(lines) == 3
    assert [(line.text, line.where, line.problem) for line in lines] == [
        ("a cat", f"{path}:1", None),
        ("", f"{path}:4", "the line is longer than 4194304 bytes; split it or shorten its {a|b|...} groups"),
        ("last --d 2", f"{path}:5", None),
    ]


def test_the_count_is_shared_by_the_check_and_the_run_until_the_file_changes(tmp_path):
    import os

    from library.prompts.prompt_file import PromptFile

    path = tmp_path / "p.txt"
    path.write_text("a\nb\n")
    assert len(PromptFile(str(path))) == 2
    path.write_text("a\nb\nc\n")
    os.utime(path, ns=(1, 1))  # a new size and time: counted again
    assert len(PromptFile(str(path))) == 3
