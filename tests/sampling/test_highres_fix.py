"""Highres fix through the real command: stage sizes, steps, seeds, files, upscalers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.images.metadata import parse_a1111_parameters, read_generation_text
from library.sampling import latent_upscaler
from library.sampling.highres_fix import first_stage_size, parse_upscaler_args
from library.sampling.pipeline import Pipeline
from tests.helpers import img2img_error, pixels, pngs
from tests.helpers import run_img2img as run

HIGHRES = ["--W", "128", "--H", "96", "--steps", "10", "--highres_fix_scale", "0.5", "--highres_fix_steps", "4",
           "--strength", "0.5"]


def test_first_stage_size_follows_the_manual():
    assert first_stage_size(1024, 1024, 0.5) == (512, 512)  # the manual's example
    assert first_stage_size(1000, 760, 0.5) == (480, 352)  # int(x * s + 0.5), down to multiples of 32
    assert first_stage_size(128, 96, 0.5) == (64, 32)
    assert first_stage_size(96, 96, 1.0) == (96, 96)
    with pytest.raises(UserError, match="under 32 pixels"):
        first_stage_size(96, 48, 0.5)


@pytest.mark.parametrize("upscaling", [[], ["--highres_fix_latents_upscaling"],
                                       ["--highres_fix_latents_upscaling", "bicubic"]])
def test_both_stages_run_with_their_sizes_steps_and_seeds(tiny_models, tmp_path, call_log, upscaling):
    out = tmp_path / "out"
    assert run(tiny_models, out, *HIGHRES, *upscaling, "--prompt", "a tower --d 41", "--highres_fix_save_1st") == 0
    assert [(e["size"], e["steps"], e["ran"], e["seeds"], e["strength"]) for e in call_log] == [
        ((64, 32), 4, 4, [41], None),  # 1st stage: txt2img, --highres_fix_steps
        ((128, 96), 10, 5, [42], 0.5),  # 2nd stage: img2img, int(10 * 0.5) steps, seed + 1
    ]
    first, final = sorted(out.glob("*_0000_41.png")), sorted(out.glob("*_1000_41.png"))  # index from 000
    assert len(first) == len(final) == 1 and len(pngs(out)) == 2
    assert Image.open(first[0]).size == (64, 32) and Image.open(final[0]).size == (128, 96)
    meta1, meta2 = read_generation_text(first[0]), read_generation_text(final[0])
    assert (meta1["seed"], meta1["steps"], meta2["seed"], meta2["steps"]) == ("41", "4", "41", "10")
    a1111 = parse_a1111_parameters(meta2["parameters"])
    assert a1111["Denoising strength"] == "0.5" and "Hires 1st pass size: 64x32" in meta2["parameters"]
    # the flag alone is bicubic, as the original
    assert a1111["Hires upscaler"] == (f"Latent ({upscaling[-1]})" if len(upscaling) == 2 else
                                       "Latent (bicubic)" if upscaling else "Lanczos")


def test_without_save_1st_only_final_images_are_written(tiny_models, tmp_path, call_log):
    out = tmp_path / "out"
    assert run(tiny_models, out, *HIGHRES, "--prompt", "x", "--images_per_prompt", "2", "--batch_size", "2",
               "--sequential_file_name") == 0
    assert [p.name for p in pngs(out)] == ["im_1000001.png", "im_1000002.png"]
    assert [len(e["seeds"]) for e in call_log] == [2, 2]
    assert [s + 1 for s in call_log[0]["seeds"]] == call_log[1]["seeds"]


def test_sequential_names_of_both_stages(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_models, out, *HIGHRES, "--prompt", "x --d 1,2", "--images_per_prompt", "2",
               "--sequential_file_name", "--highres_fix_save_1st") == 0
    assert [p.name for p in pngs(out)] == ["im_0000001.png", "im_0000002.png", "im_1000001.png", "im_1000002.png"]


def test_strength_of_the_2nd_stage(tiny_models, tmp_path, call_log, caplog):
    # as the original: the 2nd stage takes --strength / --t; --highres_fix_strength is the
    # strength of an img2img 1st stage only, so here it is ignored with a warning
    prompts = tmp_path / "p.txt"
    prompts.write_text("default --d 1\nper prompt --t 0.7 --d 2\n")
    assert run(tiny_models, tmp_path / "o", *HIGHRES, "--strength", "0.3", "--highres_fix_strength", "0.9",
               "--from_file", str(prompts)) == 0
    assert [(e["strength"], e["ran"]) for e in call_log if e["strength"] is not None] == [(0.3, 3), (0.7, 7)]
    assert "--highres_fix_strength is the strength of an img2img 1st stage (with --image_path); ignored" in caplog.text


def test_lanczos_path_re_encodes_and_latent_path_does_not(tiny_models, tmp_path, monkeypatch):
    encoded: list[tuple] = []
    real = Pipeline.encode_images

    def spy(self, images, generators, vae_batch_size=None):
        encoded.append(tuple(images.shape))
        return real(self, images, generators, vae_batch_size)

    monkeypatch.setattr(Pipeline, "encode_images", spy)
    assert run(tiny_models, tmp_path / "a", *HIGHRES, "--prompt", "x") == 0
    assert encoded == [(1, 3, 96, 128)]
    encoded.clear()
    assert run(tiny_models, tmp_path / "b", *HIGHRES, "--prompt", "x", "--highres_fix_latents_upscaling") == 0
    assert encoded == []


def test_latent_upscaler_module(tiny_models, tmp_path):
    weights = latent_upscaler.write_initial_weights(tmp_path / "up.safetensors", channels=16, blocks=2)
    module = ["--highres_fix_upscaler", "tools.latent_upscaler", "--highres_fix_upscaler_args", f"weights={weights}"]
    prompt = ["--prompt", "a boat --d 3", *HIGHRES]
    assert run(tiny_models, tmp_path / "module", *prompt, *module) == 0
    assert run(tiny_models, tmp_path / "bilinear", *prompt, "--highres_fix_latents_upscaling", "bilinear") == 0
    # zero correction: the shipped network starts out as bilinear latent upscaling
    assert np.abs(pixels(pngs(tmp_path / "module")[0]) - pixels(pngs(tmp_path / "bilinear")[0])).max() <= 1

    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state["conv_out.weight"] = torch.randn_like(state["conv_out.weight"]) * 0.05
    save_file(state, str(tmp_path / "trained.safetensors"))
    module[-1] = f"weights={tmp_path / 'trained.safetensors'}"
    assert run(tiny_models, tmp_path / "trained", *prompt, *module) == 0
    (final,) = pngs(tmp_path / "trained")
    assert Image.open(final).size == (128, 96)
    assert np.abs(pixels(final) - pixels(pngs(tmp_path / "bilinear")[0])).max() > 1
    a1111 = parse_a1111_parameters(read_generation_text(final)["parameters"])
    assert a1111["Hires upscaler"] == "tools.latent_upscaler"


def test_upscaler_module_from_a_file_returning_images(tiny_models, tmp_path, call_log):
    module = tmp_path / "my_upscaler.py"
    module.write_text(
        "from PIL import Image\n"
        "class Up:\n"
        "    def support_latents(self):\n        return False\n"
        "    def upscale(self, vae, images, latents, dtype, width, height, batch_size=1, vae_batch_size=1):\n"
        "        assert latents is None\n"
        "        return [im.resize((width, height), Image.NEAREST) for im in images]\n"
        "def create_upscaler(**kwargs):\n    assert kwargs == {'mode': 'nearest'}\n    return Up()\n"
    )
    assert run(tiny_models, tmp_path / "o", *HIGHRES, "--prompt", "x", "--highres_fix_upscaler", str(module),
               "--highres_fix_upscaler_args", "mode=nearest") == 0
    assert Image.open(pngs(tmp_path / "o")[0]).size == (128, 96)
    assert [e["size"] for e in call_log] == [(64, 32), (128, 96)]


def test_upscaler_args_parse():
    assert parse_upscaler_args(" weights = a.safetensors , device=cpu") == {"weights": "a.safetensors", "device": "cpu"}
    assert parse_upscaler_args(None) == {}
    with pytest.raises(UserError, match="expected key=value"):
        parse_upscaler_args("weights")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--highres_fix_scale", "1.5"], "--highres_fix_scale 1.5: must be above 0 and at most 1"),
        (["--highres_fix_save_1st"], "--highres_fix_save_1st needs --highres_fix_scale"),
        (["--highres_fix_scale", "0.5", "--highres_fix_latents_upscaling", "nearest"], "invalid choice: 'nearest'"),
        (["--highres_fix_scale", "0.5", "--highres_fix_upscaler", "no_such_module_xyz"],
         "--highres_fix_upscaler no_such_module_xyz: cannot import it"),
        (["--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler"],
         '--highres_fix_upscaler_args: tools.latent_upscaler needs "weights=FILE"'),
        (["--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler",
          "--highres_fix_upscaler_args", "weights={tmp}/missing.safetensors"], "missing.safetensors: no such file"),
        (["--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler",
          "--highres_fix_upscaler_args", "weights={tmp}/junk.safetensors"], "junk.safetensors: cannot read it"),
    ],
)
def test_highres_mistakes_are_one_line(tiny_models, tmp_path, capsys, extra, message):
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    err = img2img_error(tiny_models, tmp_path, capsys, "--prompt", "x", *[e.format(tmp=tmp_path) for e in extra])
    assert message in err


def test_a_line_too_small_for_the_1st_stage_is_skipped(tiny_models, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("tiny --w 48 --h 48\nfine\n")
    assert run(tiny_models, tmp_path / "o", *HIGHRES, "--from_file", str(prompts)) == 3  # a line skipped
    assert len(pngs(tmp_path / "o")) == 1
    assert re.search(r"p\.txt:1: skipped: .*under 32 pixels", caplog.text)


def test_disable_control_net_is_accepted(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "o", *HIGHRES, "--prompt", "x", "--highres_fix_disable_control_net") == 0
    assert len(pngs(tmp_path / "o")) == 1


def test_upscaler_weights_of_another_network_are_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = {"conv_in.weight": torch.zeros(8, 4, 3, 3), "other.weight": torch.zeros(2)}
    save_file(foreign, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="does not fit the network"):
        latent_upscaler.create_upscaler(weights=str(tmp_path / "w.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="not a tools.latent_upscaler network"):
        latent_upscaler.create_upscaler(weights=str(tmp_path / "x.safetensors"))
    torch.save({k: v for k, v in latent_upscaler.LatentUpscalerNet(8, 1).state_dict().items()}, tmp_path / "w.pt")
    assert latent_upscaler.create_upscaler(weights=str(tmp_path / "w.pt")).support_latents()


def test_latent_upscaler_init_tool(tmp_path):
    assert latent_upscaler.main(["--init", str(tmp_path / "w.safetensors"), "--channels", "8", "--blocks", "1"]) == 0
    up = latent_upscaler.create_upscaler(weights=str(tmp_path / "w.safetensors"))
    latents = torch.randn(2, 4, 4, 6)

    class Vae:  # only the config is read when latents are given
        class config:
            block_out_channels = (1, 1, 1, 1)

    out = up.upscale(Vae, None, latents, torch.float32, 96, 64, batch_size=1)
    expected = torch.nn.functional.interpolate(latents, size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-6)
