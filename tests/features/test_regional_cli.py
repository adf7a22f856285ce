"""Attention Couple and Regional LoRA from the command line: the manual's example, one-line
errors, forced un-merged networks, metadata, and the features it combines with."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli.parser import parse_options
from library.features.attention_couple import region_mask
from library.images.metadata import FeatureMetadata
from library.models.tiny import build_tiny_components
from library.records.jobs import Job
from library.run import build
from networks.lora_files import write_kohya_lora
from tests.helpers import img2img_error, make_source, meta, pixels, pngs, run

MANUAL_PROMPT = ("shs 2girls, looking at viewer, smile AND bsb 2girls, looking back AND 2girls "
                 "--n bad quality, worst quality")


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A red/green mask (left/right, as the manual's picture), a black mask, a second LoRA."""
    folder = tmp_path_factory.mktemp("regional")
    red_green = np.zeros((64, 64, 3), np.uint8)
    red_green[:, :32, 0] = 255
    red_green[:, 32:, 1] = 255
    Image.fromarray(red_green).save(folder / "rg.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "black.png")
    c = build_tiny_components("sd1", seed=0)
    write_kohya_lora(folder / "second.safetensors", c.text_encoder, c.unet, rank=4, seed=7)
    write_kohya_lora(folder / "third.safetensors", c.text_encoder, c.unet, rank=4, seed=8)
    return {"mask": folder / "rg.png", "black": folder / "black.png", "lora": tiny_models["lora"],
            "second": folder / "second.safetensors", "third": folder / "third.safetensors"}


def networks(files, count: int = 2) -> list[str]:
    weights = [str(files[k]) for k in ("lora", "second", "third")[:count]]
    return ["--network_module", *["networks.lora"] * count, "--network_weights", *weights]


@pytest.mark.parametrize("count", [2, 3])
def test_the_manuals_example_runs_unchanged(tiny_models, tmp_path, files, count):
    code = run(tiny_models, tmp_path, *networks(files, count), "--mask_path", str(files["mask"]),
               "--prompt", MANUAL_PROMPT, "--seed", "1")
    assert code == 0
    (image,) = pngs(tmp_path)
    data = meta(image)
    assert data["prompt"] == "shs 2girls, looking at viewer, smile AND bsb 2girls, looking back AND 2girls"
    assert data["negative-prompt"] == "bad quality, worst quality"
    assert "Region mask: rg.png, Region mode: RGB channels" in data["parameters"]


def test_more_networks_than_parts_skips_the_line_with_one_error(tiny_models, tmp_path, files, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --n blur\na cat AND a dog --n blur\n")
    with caplog.at_level(logging.ERROR):
        code = run(tiny_models, tmp_path / "out", *networks(files), "--mask_path", str(files["mask"]),
                   "--from_file", str(prompts))
    assert code == 3  # a line skipped
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{prompts}:1: skipped: 2 networks are loaded for regional LoRA but the prompt has 1 part(s); split it "
        "with ' AND ' into at least one part per network"]
    (image,) = pngs(tmp_path / "out")
    assert meta(image)["prompt"] == "a cat AND a dog"


@pytest.mark.parametrize("extra,message", [
    (("--network_regional_mask_max_color_codes", "0"),
     "--network_regional_mask_max_color_codes 0: must be 1 to 7 (the colour codes red, green, yellow, blue, "
     "magenta, cyan, white)"),
    (("--network_regional_mask_max_color_codes", "8"),
     "--network_regional_mask_max_color_codes 8: must be 1 to 7 (the colour codes red, green, yellow, blue, "
     "magenta, cyan, white)"),
    (("--attention_couple",),
     "--attention_couple needs --mask_path (the region mask); without a mask the ' AND ' parts share the whole "
     "image"),
])
def test_bad_options_exit_2_with_one_line(tiny_models, tmp_path, capsys, files, extra, message):
    err = img2img_error(tiny_models, tmp_path, capsys, "--prompt", "a AND b", *extra)
    assert err == f"gen_img.py: error: {message} (see --help)"


def test_a_mask_without_regions_exits_2_with_one_line(tiny_models, tmp_path, capsys, files):
    err = img2img_error(tiny_models, tmp_path, capsys, "--prompt", "a AND b", *networks(files),
                        "--mask_path", str(files["black"]))
    assert err == (f"gen_img.py: error: --mask_path {files['black']}: not a region mask: all three channels are "
                   "black; paint each part's region (R, G, B channels, or exact colour codes with "
                   "--network_regional_mask_max_color_codes)")


def test_regional_mode_runs_the_networks_unmerged_and_says_so_once(tiny_models, tmp_path, files, caplog):
    common = (*networks(files), "--mask_path", str(files["mask"]), "--prompt", "a cat AND a dog", "--seed", "4")
    with caplog.at_level(logging.INFO, logger="library.features.lora"):
        assert run(tiny_models, tmp_path / "merge", *common, "--network_merge") == 0
    said = [r.getMessage() for r in caplog.records if "regional LoRA" in r.getMessage()]
    assert said == ["regional LoRA: --network_merge / --network_merge_n_models / --network_pre_calc ignored; the "
                    "networks run un-merged so that each acts in its region only"]
    assert run(tiny_models, tmp_path / "plain", *common) == 0
    assert np.array_equal(pixels(pngs(tmp_path / "merge")[0]), pixels(pngs(tmp_path / "plain")[0]))


def test_with_networks_the_mask_is_not_an_inpainting_mask(tiny_models, tmp_path, files):
    source = make_source(tmp_path / "source.png")
    argv = ["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), "--image_path", str(source),
            "--mask_path", str(files["mask"]), *networks(files), "--prompt", "a AND b"]
    options = parse_options(argv)
    model = build.load(options.load, build.Runtime.from_options(options.load))
    pipeline = build.pipeline(options, model, build.Runtime.from_options(options.load), build.networks(options, model))
    runner = build.runner(options, model, pipeline)
    assert runner.sources.masks == []
    image = Job("a AND b", "", seed=1, width=64, height=64, steps=3, scale=7.0)
    assert pipeline.metadata(image) == FeatureMetadata(
        parameters=(("Region mask", "rg.png"), ("Region mode", "RGB channels")))


def _change_of_part_2(tiny_models, tmp_path: Path, *extra: str) -> np.ndarray:
    """|pixel change| (H, W) when part 2's text changes, for a run with `extra` options."""
    images = []
    for name, second in (("a", "a dog"), ("b", "a red house on a hill")):
        assert run(tiny_models, tmp_path / name, "--prompt", f"a cat AND {second} --n blur", "--seed", "2",
                   *extra) == 0
        images.append(pixels(pngs(tmp_path / name)[-1]))
    return np.abs(images[0] - images[1]).max(axis=-1)


@pytest.mark.parametrize("name,extra", [
    ("attention couple, no networks", ("--attention_couple",)),
    ("negative scale", ("--negative_scale", "2")),
    ("highres fix", ("--highres_fix_scale", "0.5", "--W", "128", "--H", "128", "--highres_fix_steps", "2")),
    ("img2img", ("--image_path", "SOURCE", "--strength", "0.7")),
    ("controlnet", ("--control_net_models", "CONTROLNET", "--guide_image_path", "SOURCE")),
    ("batch of 2", ("--images_per_prompt", "2", "--batch_size", "2")),
])
def test_it_combines_with_the_other_features(tiny_models, tmp_path, files, name, extra):
    source = str(make_source(tmp_path / "source.png"))
    extra = tuple(source if e == "SOURCE" else str(tiny_models["controlnet-sd1"]) if e == "CONTROLNET" else e
                  for e in extra)
    nets = () if name.startswith("attention couple") else tuple(networks(files))
    change = _change_of_part_2(tiny_models, tmp_path, "--mask_path", str(files["mask"]), *nets, *extra)
    assert change.max() > 0, name


def test_with_highres_fix_the_mask_is_read_at_the_first_stage_size(tiny_models, tmp_path, files):
    options = parse_options(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path), *networks(files),
                             "--mask_path", str(files["mask"]), "--W", "192", "--H", "128",
                             "--highres_fix_scale", "0.5", "--network_regional_mask_max_color_codes", "2",
                             "--prompt", "a"])
    mask = region_mask(options)
    assert mask.pixels.shape == (64, 96, 3) and mask.mode == "colour codes (2)"
    options = parse_options(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path), "--attention_couple",
                             "--mask_path", str(files["mask"]), "--W", "128", "--prompt", "a"])
    assert region_mask(options).pixels.shape == (64, 64, 3)  # --H not given: the mask's own size
