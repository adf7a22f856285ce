"""Mistakes the options and files already tell are refused in one line before the model loads:
`--network_args`, the tokenizer cache folder, the upscaler module, a 1x1 img2img source, a
full disk under `--outdir`."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
from PIL import Image

import gen_img
from library.cli import preflight


@pytest.fixture
def no_model_load(monkeypatch):
    from library.run import build

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(build, "load", refuse)


def _error(tiny_models, tmp_path, capsys, *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), "--prompt", "x",
                             "--steps", "2", *extra])
        raise SystemExit(code)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    return err[0]


def test_network_args(tiny_models, tmp_path, capsys, no_model_load):
    assert _error(tiny_models, tmp_path, capsys, "--network_module", "networks.lora", "--network_weights",
                  str(tiny_models["lora"]), "--network_args", "conv_dim") == (
        'gen_img.py: error: --network_args "conv_dim": expected key=value items separated by commas')


def test_tokenizer_cache_folder_that_is_a_file(tiny_models, tmp_path, capsys, no_model_load):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    assert _error(tiny_models, tmp_path, capsys, "--tokenizer_cache_dir", str(cache)) == (
        f"gen_img.py: error: --tokenizer_cache_dir {cache}: is not a folder; give a folder path")


def test_upscaler_module_that_does_not_exist(tiny_models, tmp_path, capsys, no_model_load):
    assert _error(tiny_models, tmp_path, capsys, "--highres_fix_scale", "0.5", "--W", "128", "--H", "128",
                  "--highres_fix_upscaler", "no_such_upscaler_module") == (
        "gen_img.py: error: --highres_fix_upscaler no_such_upscaler_module: cannot import it "
        "(no module named 'no_such_upscaler_module')")


def test_a_1x1_source(tiny_models, tmp_path, capsys, no_model_load):
    source = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(source)
    assert _error(tiny_models, tmp_path, capsys, "--image_path", str(source)) == (
        f"gen_img.py: error: --image_path {source}: 1x1 pixels; a source used at its own size needs at least "
        "8 pixels a side (or give --W and --H)")


def test_a_full_disk(tiny_models, tmp_path, capsys, no_model_load, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    assert _error(tiny_models, tmp_path, capsys) == (
        f"gen_img.py: error: --outdir {tmp_path / 'out'}: the disk is full (4 KiB free); free some space first")
    assert preflight.MIN_FREE_BYTES == 16 * 1024 * 1024
