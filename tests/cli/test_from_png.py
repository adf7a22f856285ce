"""`--from_png`: this tool's pictures made again bit for bit, A1111/Forge texts read field by field,
and every bad PNG refused in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import gen_img
from library.images.infotext_reader import read_png_settings
from tests.helpers import meta, pixels, pngs, run

LINES = (
    "a {red|blue} cat --n dog --d 5,15 --w 64 --h 72 --s 4 --l 6 --vs 9 --vss 0.4\n"
    "two parts AND a tree --d 6,16 --dsd1 1 --dst1 900 --nl 2 --srw 48 --srh 56\n"
    "a house --d 7,17 --glt 800 --glr 0.5 --gls 0.25\n"
    "a boat --d 8,18 --sa DPM++ 2M SDE Karras --s 4\n"
)


def _same_images(made: list[Path], again: list[Path]) -> list[bool]:
    return [np.array_equal(pixels(a), pixels(b)) for a, b in zip(made, again, strict=True)]


def test_pictures_of_this_tool_are_made_again_bit_for_bit(tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(LINES)
    common = ["--sampler", "euler_a", "--eta_noise_seed_delta", "31337", "--negative_scale", "3"]
    assert run(tiny_models, tmp_path / "made", *common, "--from_file", str(prompts), "--images_per_prompt", "2") == 0
    assert gen_img.main(["--outdir", str(tmp_path / "again"), "--from_png", str(tmp_path / "made")]) == 0
    made, again = pngs(tmp_path / "made"), pngs(tmp_path / "again")
    assert _same_images(made, again) == [True] * 8
    assert [meta(p)["prompt"] for p in again] == [meta(p)["prompt"] for p in made]
    assert meta(again[7])["sampler"] == "dpmsolver++_sde_karras"
    assert [meta(p)["variation-seed"] for p in made[:2]] == ["9", "10"]


def test_highres_fix_and_lora_are_made_again_and_options_beside_it_win(tiny_models, tmp_path):
    lora = ["--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"]), "--network_mul", "0.7"]
    assert run(tiny_models, tmp_path / "made", *lora, "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
               "--sampler", "DPM++ 2M Karras", "--prompt", "a cat --d 3 --am 0.4 --t 0.6") == 0
    (made,) = pngs(tmp_path / "made")
    assert json.loads(meta(made)["run-options"])["highres_fix_scale"] == 0.5
    assert gen_img.main(["--outdir", str(tmp_path / "again"), "--from_png", str(made)]) == 0
    assert _same_images([made], pngs(tmp_path / "again")) == [True]
    assert gen_img.main(["--outdir", str(tmp_path / "steps"), "--from_png", str(made), "--steps", "2"]) == 0
    (changed,) = pngs(tmp_path / "steps")
    assert (meta(changed)["steps"], meta(changed)["seed"]) == ("2", "3")
    assert "Sampler: DPM++ 2M Karras" in meta(changed)["parameters"]
    assert "<lora:tiny-lora-sd1:0.4>" in meta(changed)["parameters"]


def _png(path: Path, **text: str) -> Path:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    return path


WEBUI_DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
    "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
FORGE = (
    "a castle\nNegative prompt: blur\n"
    "Steps: 40, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 3458746777, Size: 1024x1024, Model hash: "
    "7873076e72, Model: SDXL_myown_Sevenof9_VAE, Denoising strength: 0.6, Clip skip: 1, Hires upscale: 2, "
    "Hires steps: 20, Hires upscaler: R-ESRGAN 4x+, Extra noise: 0.1, Version: f0.0.17v1.8.0rc-latest-278-gbfee03d8"
)
FULL = (
    "a dog\nSteps: 30, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 5, Seed: 12, Face restoration: "
    "CodeFormer, Size: 512x768, Model hash: abc, VAE: vae-ft-mse.safetensors, Variation seed: 77, Variation seed "
    "strength: 0.25, Seed resize from: 448x640, Clip skip: 2, ENSD: 31337, RNG: CPU, Eta DDIM: 0.5, "
    "Hires resize: 1024x1536, Hires upscaler: Latent (bicubic), Denoising strength: 0.55"
)


def test_the_web_ui_docstring_example_is_read_field_by_field(tmp_path):
    s = read_png_settings(_png(tmp_path / "a.png", parameters=WEBUI_DOCSTRING))
    assert s.prompt.startswith("girl with an artist's beret") and s.negative.endswith("messy drawing")
    assert s.line == {"s": "20", "d": "965400086", "l": "7.0", "w": "512", "h": "512"}
    assert s.run == {"sampler": "euler_a"}
    assert s.ignored == []


def test_the_forge_example_is_read_and_what_we_lack_is_named(tmp_path):
    s = read_png_settings(_png(tmp_path / "f.png", parameters=FORGE))
    assert (s.prompt, s.negative) == ("a castle", "blur")
    assert s.line == {"s": "20", "d": "3458746777", "l": "4.5", "w": "2048", "h": "2048", "t": "0.6"}
    assert s.run == {"sampler": "dpmsolver++_karras", "clip_skip": 1, "highres_fix_scale": 0.5,
                     "highres_fix_steps": 40}
    assert s.ignored == ["Hires upscaler: R-ESRGAN 4x+ (Lanczos used)", "Extra noise: 0.1"]


def test_every_documented_field_we_can_use_is_used(tmp_path):
    s = read_png_settings(_png(tmp_path / "x.png", parameters=FULL))
    assert s.line == {"s": "30", "d": "12", "l": "5.0", "w": "1024", "h": "1536", "vs": "77", "vss": "0.25",
                      "srw": "448", "srh": "640", "t": "0.55"}
    assert s.run == {"sampler": "dpmsolver++_sde_karras", "clip_skip": 2, "eta_noise_seed_delta": 31337,
                     "ddim_eta": 0.5, "noise_device": "cpu", "highres_fix_scale": 0.5, "highres_fix_steps": 30,
                     "highres_fix_latents_upscaling": "bicubic"}
    assert s.ignored == ["Face restoration: CodeFormer", "VAE: vae-ft-mse.safetensors (give --vae)"]


def test_what_is_not_understood_is_one_warning_line(tiny_models, tmp_path, caplog):
    text = FORGE.replace("Size: 1024x1024", "Size: 32x32").replace("Steps: 40", "Steps: 2").replace(
        "Hires steps: 20", "Hires steps: 2")
    png = _png(tmp_path / "f.png", parameters=text)
    with caplog.at_level(logging.WARNING):
        assert gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"),
                             "--from_png", str(png)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "not understood" in r.getMessage()]
    assert warnings == [f"{png} (A1111/Forge parameters): not understood, ignored: Hires upscaler: R-ESRGAN 4x+ "
                        "(Lanczos used); Extra noise: 0.1"]
    (made,) = pngs(tmp_path / "out")
    assert Image.open(made).size == (64, 64)
    assert (meta(made)["seed"], meta(made)["steps"], meta(made)["sampler"]) == ("3458746777", "2",
                                                                                "dpmsolver++_karras")


def _error(tmp_path: Path, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        gen_img.main(["--outdir", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    return err


def test_bad_pngs_are_one_line_before_any_model_loads(tmp_path, capsys):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    assert _error(tmp_path, capsys, "--from_png", str(bare)) == (
        f"gen_img.py: error: --from_png {bare}: no generation settings in its metadata (no parameters text, no "
        "prompt and seed keys) (see --help)\n")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(tmp_path / "whole.png", parameters=WEBUI_DOCSTRING).read_bytes()[:60])
    assert _error(tmp_path, capsys, "--from_png", str(truncated)).startswith(
        f"gen_img.py: error: {truncated}: not an image or damaged (")
    garbage = _png(tmp_path / "g.png", parameters="just some words\nno settings here")
    assert _error(tmp_path, capsys, "--from_png", str(garbage)) == (
        f"gen_img.py: error: --from_png {garbage}: its parameters text has no settings line (like \"Steps: 20, "
        "Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\") (see --help)\n")
    words = _png(tmp_path / "w.png", parameters="a\nSteps: many, Sampler: Euler, Seed: 1, Size: 64x64")
    assert _error(tmp_path, capsys, "--from_png", str(words)) == (
        f'gen_img.py: error: --from_png {words}: "Steps: many" is not a whole number (see --help)\n')
    comfy = _png(tmp_path / "c.png", prompt='{"3": {"class_type": "KSampler"}}', workflow="{}")
    assert _error(tmp_path, capsys, "--from_png", str(comfy)) == (
        f"gen_img.py: error: --from_png {comfy}: a ComfyUI picture (its settings are a node graph); --from_png "
        "reads this tool's, the original tool's and A1111/Forge metadata only (see --help)\n")
    assert _error(tmp_path, capsys, "--from_png", str(tmp_path / "nope.png")) == (
        f"gen_img.py: error: --from_png {tmp_path / 'nope.png'}: no such file or folder (see --help)\n")


def test_a_folder_of_pngs_with_different_samplers_is_refused(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    _png(folder / "a.png", parameters="x\nSteps: 2, Sampler: Euler a, Seed: 1, Size: 64x64")
    _png(folder / "b.png", parameters="y\nSteps: 2, Sampler: DDIM, Seed: 1, Size: 64x64")
    assert _error(tmp_path, capsys, "--from_png", str(folder)) == (
        f"gen_img.py: error: --from_png {folder}: a.png and b.png differ in --sampler (euler_a / ddim); one run "
        "has one value: regenerate them separately (see --help)\n")


def test_the_original_tools_keys_and_the_image_size(tmp_path):
    s = read_png_settings(_png(tmp_path / "o.png", prompt="a cat", seed="7", sampler="k_euler_a", steps="20",
                               scale="7.5", **{"negative-prompt": "dog", "negative-scale": "2"}))
    assert (s.source, s.prompt, s.negative) == ("the original tool", "a cat", "dog")
    assert s.line == {"w": "64", "h": "64", "s": "20", "d": "7", "l": "7.5", "nl": "2.0"}
    assert s.run == {"sampler": "k_euler_a"}


def test_a_prompt_lora_tag_is_made_again(tiny_models, tmp_path):
    lora_dir = str(Path(tiny_models["lora"]).parent)
    assert run(tiny_models, tmp_path / "made", "--lora_dir", lora_dir,
               "--prompt", "a cat <lora:tiny-lora-sd1:0.6> --d 4") == 0
    assert run(tiny_models, tmp_path / "plain", "--prompt", "a cat --d 4") == 0
    (made,), (plain,) = pngs(tmp_path / "made"), pngs(tmp_path / "plain")
    assert json.loads(meta(made)["job-options"])["tags"] == "<lora:tiny-lora-sd1:0.6:0.6>"
    assert gen_img.main(["--outdir", str(tmp_path / "again"), "--from_png", str(made)]) == 0
    assert _same_images([made], pngs(tmp_path / "again")) == [True]
    assert not np.array_equal(pixels(made), pixels(plain))  # the tag changed the picture


def test_an_sdxl_picture_with_its_size_conditioning_is_made_again(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "made", "--prompt", "a cat --oh 96 --ct 8 --n blur --d 4",
               "--original_width_negative", "40", kind="sdxl") == 0
    (made,) = pngs(tmp_path / "made")
    assert gen_img.main(["--outdir", str(tmp_path / "again"), "--from_png", str(made)]) == 0
    (again,) = pngs(tmp_path / "again")
    assert _same_images([made], [again]) == [True]
    keys = ("original-height", "crop-top", "original-width-negative", "seed")
    assert [meta(again)[k] for k in keys] == [meta(made)[k] for k in keys] == ["96", "8", "40", "4"]
