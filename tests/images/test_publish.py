"""Publishing an image never leaves an empty or partial file under its name, also where the
file system has no hard links and the process dies at the publish step; `--skip_existing`
makes an empty or truncated image again; no NUL reaches a PNG text chunk."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from library.images import output_files
from library.images.metadata import read_generation_text
from tests.helpers import ROOT, meta, pixels, pngs, run


def _no_links(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)


def _picture() -> Image.Image:
    return Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "RGB")


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "check-then-rename"])
def test_without_hard_links_the_name_gets_the_whole_file_and_never_replaces(tmp_path, monkeypatch, renameat2):
    _no_links(monkeypatch)
    if not renameat2:
        monkeypatch.setattr(output_files, "_libc_renameat2", lambda: None)
    first = output_files.save_image(_picture(), tmp_path, "a.png", {"prompt": "one"})
    second = output_files.save_image(_picture(), tmp_path, "a.png", {"prompt": "two"})
    assert (first.name, second.name) == ("a.png", "a_1.png")
    assert read_generation_text(first) == {"prompt": "one"} and read_generation_text(second) == {"prompt": "two"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_1.png"]


def test_an_interrupt_at_the_publish_step_leaves_no_file(tmp_path, monkeypatch):
    _no_links(monkeypatch)

    def interrupted(tmp, final):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_files, "_rename_no_replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output_files.save_image(_picture(), tmp_path, "a.png", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


KILLED_AT_PUBLISH = """
import errno, os, signal, sys
from pathlib import Path
import numpy as np
from PIL import Image
from library.images import output_files

def refuse(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")

def killed(tmp, final):
    os.kill(os.getpid(), signal.SIGKILL)

os.link = refuse
output_files._rename_no_replace = killed
picture = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8), "RGB")
output_files.save_image(picture, Path(sys.argv[1]), "a.png", {"prompt": "x"})
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_kill_at_the_publish_step_leaves_no_empty_image(tmp_path):
    outdir = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILLED_AT_PUBLISH, str(outdir)], cwd=ROOT, capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    names = [p.name for p in outdir.iterdir()]
    assert "a.png" not in names
    assert len(names) == 1 and names[0].startswith(".a.png.") and names[0].endswith(".part")
    assert os.path.getsize(outdir / names[0]) > 0  # the finished file waited under its hidden name


def test_skip_existing_makes_empty_and_truncated_images_again(tiny_models, tmp_path, caplog):
    out = tmp_path / "out"
    common = ["--prompt", "a cat", "--images_per_prompt", "3", "--seed", "7", "--steps", "1",
              "--sequential_file_name"]
    assert run(tiny_models, out, *common) == 0
    first = {p.name: pixels(p) for p in pngs(out)}
    empty, truncated, sound = pngs(out)
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:-30])
    kept = sound.stat().st_mtime_ns
    assert run(tiny_models, out, *common, "--skip_existing") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
    for path in pngs(out):
        assert np.array_equal(pixels(path), first[path.name])
    assert sound.stat().st_mtime_ns == kept
    assert meta(truncated)["seed"] and meta(empty)["seed"]


def test_skip_existing_without_seed_says_it_cannot_find_earlier_files(tiny_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="library.run.build"):
        assert run(tiny_models, tmp_path / "out", "--prompt", "a cat", "--steps", "1", "--skip_existing") == 0
    assert caplog.messages == [
        "--skip_existing without --seed: the seeds are drawn anew, so the default file names (which hold the seed) "
        "cannot match the earlier run's files; give the earlier run's --seed (or --sequential_file_name)"]


def test_no_nul_in_png_text_chunks(tmp_path):
    path = output_files.save_image(_picture(), tmp_path, "a.png", {"prompt": "a\0cat", "k\0ey": "v"})
    assert read_generation_text(path) == {"prompt": "acat", "key": "v"}
    assert b"a\0cat" not in path.read_bytes()
