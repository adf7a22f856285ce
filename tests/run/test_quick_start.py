"""The README's quick start: without --ckpt the first run writes the demo model's one file,
announces it in one line, and the image gets the file name the README gives."""

from __future__ import annotations

import logging
import re

import gen_img
from library.models import load_model
from library.run import build
from tests.helpers import ROOT, pngs


def _readme_name_pattern() -> re.Pattern:
    """The first image's name as the README's quick start gives it, `im_<time>_000_<seed>.png`,
    as a regular expression (`<time>`: 14 digits, `<seed>`: digits)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    name = re.search(r"`outputs/(im_<time>_\d+_<seed>\.png)`", readme).group(1)
    return re.compile(re.escape(name).replace("<time>", r"\d{14}").replace("<seed>", r"\d+") + "$")


def _demo_run(outdir, caplog) -> list[str]:
    """The quick start's command (smaller and shorter) and the lines it logged from the build step."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.run.build"):
        assert gen_img.main(["--prompt", "a photo of a cat --n blurry", "--outdir", str(outdir),
                             "--W", "64", "--H", "64", "--steps", "2"]) == 0
    return [r.getMessage() for r in caplog.records if r.name == "library.run.build"]


def test_first_run_writes_only_the_demo_model_and_names_the_image_as_the_readme(tmp_path, monkeypatch, caplog):
    models = tmp_path / "models"
    monkeypatch.setattr(build, "DEMO_DIR", models)
    demo = models / "demo-sd1.safetensors"

    lines = _demo_run(tmp_path / "outputs", caplog)
    size = demo.stat().st_size
    assert lines == [f"no --ckpt given: using the demo model {demo}, written now ({size / 1e6:.0f} MB) "
                     "(tiny, random weights: the images are noise; give your model with --ckpt)"]
    assert sorted(p.name for p in models.iterdir()) == ["demo-sd1.safetensors"]  # no lock, no partial file
    images = pngs(tmp_path / "outputs")
    assert len(images) == 1 and _readme_name_pattern().match(images[0].name), [p.name for p in images]

    written = demo.stat().st_mtime_ns
    assert _demo_run(tmp_path / "again", caplog) == [
        f"no --ckpt given: using the demo model {demo} "
        "(tiny, random weights: the images are noise; give your model with --ckpt)"]
    assert demo.stat().st_mtime_ns == written  # the second run reads it, writes nothing
    assert sorted(p.name for p in models.iterdir()) == ["demo-sd1.safetensors"]


def test_demo_model_attends_only_at_its_deepest_level(tmp_path, monkeypatch):
    """The demo U-Net's attention runs 4x below the latent's size on each side (256 tokens at
    the default 512x512), so the first image is quick; detection reads that from the file."""
    from library.models.tiny_files import make_demo_model

    path, written = make_demo_model(tmp_path)
    assert written and make_demo_model(tmp_path) == (path, False)
    config = load_model(str(path)).unet.config
    assert config.down_block_types == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    assert config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert tuple(config.block_out_channels) == (32, 32, 64)
