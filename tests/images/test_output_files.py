"""Tests for library/images/output_files.py: output file names and atomic, never-overwriting saves."""

from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path

import pytest
from PIL import Image

from library.errors import UserError
from library.images.metadata import read_generation_text
from library.images.output_files import output_file_name, save_image, timestamp_now

# ----------------------------------------------------------------------------- names


def test_default_name():
    assert output_file_name(timestamp="20240102030405", index=3, seed=42) == "im_20240102030405_003_42.png"


def test_default_name_highres_stages():
    assert output_file_name(timestamp="20240102030405", index=3, seed=42, highres_stage="0") == "im_20240102030405_0003_42.png"
    assert output_file_name(timestamp="20240102030405", index=12, seed=7, highres_stage="1") == "im_20240102030405_1012_7.png"


def test_sequential_name():
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=7) == "im_000007.png"
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=7, highres_stage="1") == "im_1000007.png"


def test_original_name_uses_source_stem():
    assert output_file_name(timestamp="t", index=0, seed=1, original_name="/in/photo.v2.jpg") == "photo.v2.png"
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=3, original_name="a.webp") == "a.png"


def test_prompt_file_name():
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat") == "cat.png"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.webp") == "cat.webp"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.PNG") == "cat.PNG"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.jpg") == "cat.jpg.png"
    both = output_file_name(timestamp="t", index=0, seed=1, sequential=2, original_name="x.png", prompt_file_name="dog")
    assert both == "dog.png"


def test_timestamp_now_format():
    assert re.fullmatch(r"\d{14}", timestamp_now())


# ----------------------------------------------------------------------------- saving


def _img(color=(10, 20, 30), size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_save_never_overwrites(tmp_path):
    first = save_image(_img((1, 2, 3)), tmp_path, "a.png", {"k": "1"})
    second = save_image(_img((4, 5, 6)), tmp_path, "a.png", {"k": "2"})
    third = save_image(_img((7, 8, 9)), tmp_path, "a.png", {"k": "3"})
    assert [first.name, second.name, third.name] == ["a.png", "a_1.png", "a_2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_1.png", "a_2.png"]
    assert Image.open(first).getpixel((0, 0)) == (1, 2, 3)
    assert Image.open(second).getpixel((0, 0)) == (4, 5, 6)
    assert read_generation_text(third) == {"k": "3"}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_saved_file_mode_follows_umask(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    saved = save_image(_img(), tmp_path, "a.png", {})
    assert saved.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_save_creates_outdir(tmp_path):
    out = save_image(_img(), tmp_path / "x" / "y", "b.png", {})
    assert out == tmp_path / "x" / "y" / "b.png"


def test_save_outdir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^--outdir .*f: is not a folder; give a folder path$"):
        save_image(_img(), tmp_path / "f", "a.png", {})


@pytest.mark.parametrize("name", ["sub/a.png", "..", "", "a\\b.png"])
def test_save_rejects_paths_as_names(tmp_path, name):
    with pytest.raises(UserError, match="must be a plain file name; remove folders from --f"):
        save_image(_img(), tmp_path, name, {})


def test_save_concurrent_same_name(tmp_path):
    results: list[Path] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        path = save_image(_img((i, i, i)), tmp_path, "same.png", {"i": str(i)})
        with lock:
            results.append(path)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"] + [f"same_{n}.png" for n in range(1, 8)]
    for path in results:
        i = int(read_generation_text(path)["i"])
        assert Image.open(path).getpixel((0, 0)) == (i, i, i)


def _failing_png_writer(exc: BaseException):
    def write(im, fp, filename):
        fp.write(b"\x89PNG\r\n\x1a\n half")  # a partial file, then the failure
        raise exc

    return write


@pytest.mark.parametrize("exc", [RuntimeError("encoder exploded"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, exc):
    keep = save_image(_img((9, 9, 9)), tmp_path, "a.png", {})
    monkeypatch.setitem(Image.SAVE, "PNG", _failing_png_writer(exc))
    with pytest.raises(type(exc)):
        save_image(_img(), tmp_path, "a.png", {})
    with pytest.raises(type(exc)):
        save_image(_img(), tmp_path, "new.png", {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    monkeypatch.undo()
    assert Image.open(keep).getpixel((0, 0)) == (9, 9, 9)


def test_disk_error_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(Image.SAVE, "PNG", _failing_png_writer(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match=r"disk full while writing a\.png; free some space \(nothing partial was left\)$"):
        save_image(_img(), tmp_path, "a.png", {})
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_not_a_png(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    real = Image.SAVE["PNG"]

    def spy(im, fp, filename):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(im, fp, filename)

    monkeypatch.setitem(Image.SAVE, "PNG", spy)
    save_image(_img(), tmp_path, "a.png", {})
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].startswith(".a.png.") and seen[0][0].endswith(".part")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_save_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    a = save_image(_img((1, 1, 1)), tmp_path, "a.png", {"x": "1"})
    b = save_image(_img((2, 2, 2)), tmp_path, "a.png", {"x": "2"})
    assert (a.name, b.name) == ("a.png", "a_1.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_1.png"]
    assert read_generation_text(a) == {"x": "1"} and read_generation_text(b) == {"x": "2"}


def test_webp_stores_parameters_in_exif(tmp_path):
    text = {"prompt": "p", "parameters": "日本 cat\nSteps: 20, Sampler: Euler, CFG scale: 7"}
    path = save_image(_img(), tmp_path, "x.webp", text)
    assert path.name == "x.webp"
    with Image.open(path) as im:
        assert im.format == "WEBP"
    assert read_generation_text(path) == {"parameters": text["parameters"]}
