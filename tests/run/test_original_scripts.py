"""Command lines and prompt files written for the original run unchanged: several ControlNets
with their own guides, short per-model value lists, Gradual Latent with another sampler,
`--prompt` beside another prompt source, `--d -1`, the `raw-prompt` key (files, seeds, metadata,
pixels where they are the point)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import meta, pixels, pngs, run


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _guide(path: Path, seed: int) -> str:
    """A flat picture of one random colour (guides of different brightness steer apart)."""
    rng = np.random.default_rng(seed)
    Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3))).save(path)
    return str(path)


@pytest.fixture
def guides(tmp_path) -> tuple[str, str]:
    return _guide(tmp_path / "a.png", 1), _guide(tmp_path / "b.png", 2)


@pytest.fixture(scope="module")
def hint_nets(tiny_models, tmp_path_factory) -> list[str]:
    """Two tiny ControlNet folders whose hint matters (the tiny files' hint encoder is too weak to
    move a pixel): their hint encoder's weights scaled up 4x, the second's output negated."""
    import torch
    from diffusers import ControlNetModel

    folder = tmp_path_factory.mktemp("hint-nets")
    paths = []
    for n, sign in enumerate((1.0, -1.0)):
        net = ControlNetModel.from_pretrained(tiny_models["controlnet-sd1-diffusers"])
        with torch.no_grad():
            for param in net.controlnet_cond_embedding.parameters():
                param.mul_(4.0)
            net.controlnet_cond_embedding.conv_out.weight.mul_(sign)
        net.save_pretrained(folder / f"net{n}", safe_serialization=True)
        paths.append(str(folder / f"net{n}"))
    return paths


@pytest.fixture
def two_nets(hint_nets) -> list[str]:
    return ["--control_net_models", *hint_nets]


def _image(tiny_models, outdir: Path, *extra: str) -> np.ndarray:
    assert run(tiny_models, outdir, "--prompt", "a house --d 5", "--sampler", "ddim", *extra) == 0
    (png,) = pngs(outdir)
    assert meta(png)["seed"] == "5"
    return pixels(png)


def test_controlnet_k_gets_guide_k(tiny_models, tmp_path, guides, two_nets):
    """`--control_net_models c0 c1 --guide_image_path a b`: c0 sees a, c1 sees b (the original's
    grouping): with c1 off (weight 0) the image is c0 with a alone for both, with c0 off c1 with b."""
    a, b = guides
    nets = two_nets
    both = _image(tiny_models, tmp_path / "ab", *nets, "--guide_image_path", a, b)
    first_only = _image(tiny_models, tmp_path / "ab10", *nets, "--guide_image_path", a, b,
                        "--control_net_weights", "1", "0")
    assert np.array_equal(first_only, _image(tiny_models, tmp_path / "a10", *nets, "--guide_image_path", a,
                                             "--control_net_weights", "1", "0"))
    second_only = _image(tiny_models, tmp_path / "ab01", *nets, "--guide_image_path", a, b,
                         "--control_net_weights", "0", "1")
    assert np.array_equal(second_only, _image(tiny_models, tmp_path / "b01", *nets, "--guide_image_path", b,
                                              "--control_net_weights", "0", "1"))
    one_guide = _image(tiny_models, tmp_path / "a", *nets, "--guide_image_path", a)
    assert np.abs(both - one_guide).max() > 10  # two guides are not one


def test_guides_go_in_groups_per_image(tmp_path, guides):
    from library.images.input_images import GuideImages

    a, b = guides
    c = _guide(tmp_path / "c.png", 3)
    d = _guide(tmp_path / "d.png", 4)
    grouped = GuideImages([a, b, c, d], per_image=2)
    assert [grouped.next_group() for _ in range(3)] == [(a, b), (c, d), (a, b)]
    assert [GuideImages([a], per_image=2).next_group() for _ in range(2)] == [(a,), (a,)]


def test_short_controlnet_values_fill_with_the_originals_defaults(tiny_models, tmp_path, guides, two_nets, caplog):
    """One `--control_net_weights` value for two ControlNets is the first one's; the second takes 1.0."""
    a, b = guides
    nets = [*two_nets, "--guide_image_path", a, b]
    with caplog.at_level(logging.WARNING):
        short = _image(tiny_models, tmp_path / "short", *nets, "--control_net_multipliers", "0")
    assert _warnings(caplog) == ["--control_net_weights has 1 value(s) for 2 models (--control_net_models): the last "
                                 "1 take the default 1.0 (as the original)"]
    assert np.array_equal(short, _image(tiny_models, tmp_path / "full", *nets, "--control_net_weights", "0", "1"))
    assert not np.array_equal(short, _image(tiny_models, tmp_path / "zero", *nets, "--control_net_weights", "0", "0"))
    params = meta(pngs(tmp_path / "short")[0])["parameters"]
    assert "ControlNet 0: \"Module: none, Model: net0, Weight: 0," in params
    assert "ControlNet 1: \"Module: none, Model: net1, Weight: 1," in params


def test_short_network_mul_fills_with_1(tiny_models, tmp_path, caplog):
    from library.models import load_model
    from networks.lora_files import write_kohya_lora

    model = load_model(str(tiny_models["sd1"]))
    loras = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    for seed, path in enumerate(loras):
        write_kohya_lora(path, model.text_encoder, model.unet, rank=4, seed=seed)
    nets = ["--network_module", "networks.lora", "networks.lora", "--network_weights", *map(str, loras)]
    with caplog.at_level(logging.WARNING):
        short = _image(tiny_models, tmp_path / "short", *nets, "--network_mul", "0.5")
    assert _warnings(caplog) == ["--network_mul has 1 value(s) for 2 models (--network_module): the last 1 take the "
                                 "default 1.0 (as the original)"]
    assert np.array_equal(short, _image(tiny_models, tmp_path / "full", *nets, "--network_mul", "0.5", "1"))
    assert not np.array_equal(short, _image(tiny_models, tmp_path / "same", *nets, "--network_mul", "0.5", "0.5"))


def test_gradual_latent_with_another_sampler_warns_and_generates_without_it(tiny_models, tmp_path, caplog):
    plain = _image(tiny_models, tmp_path / "plain")
    with caplog.at_level(logging.WARNING):
        cli = _image(tiny_models, tmp_path / "cli", "--gradual_latent_timesteps", "750")
    assert _warnings(caplog) == ["--gradual_latent_timesteps ignored: Gradual Latent works with --sampler euler_a or "
                                 "k_euler_a, not ddim; generating without it (as the original)"]
    assert np.array_equal(cli, plain)
    caplog.clear()
    lines = tmp_path / "p.txt"
    lines.write_text("a house --d 5 --glt 700 --glr 0.5\na house --d 5 --glt 800\n")
    with caplog.at_level(logging.WARNING):
        assert run(tiny_models, tmp_path / "file", "--from_file", str(lines), "--sampler", "ddim") == 0
    assert _warnings(caplog) == ["Gradual Latent (--glt and the other --gl options of prompt lines) works with "
                                 "--sampler euler_a or k_euler_a, not ddim; those images are made without it "
                                 "(as the original)"]
    files = pngs(tmp_path / "file")
    assert len(files) == 2 and all(np.array_equal(pixels(f), plain) for f in files)


@pytest.mark.parametrize("source", ["from_file", "from_module"])
def test_prompt_beside_another_source_takes_the_other(tiny_models, tmp_path, caplog, source):
    path = tmp_path / ("p.txt" if source == "from_file" else "p.py")
    path.write_text("a boat --d 9\n" if source == "from_file" else
                    "def get_prompter(args, pipe, networks):\n    return iter(['a boat --d 9'])\n")
    with caplog.at_level(logging.WARNING):
        assert run(tiny_models, tmp_path / "o", "--prompt", "a house --d 5", f"--{source}", str(path)) == 0
    assert _warnings(caplog) == [f"--prompt ignored: --{source} gives the prompts (as the original); leave one of "
                                 "them out"]
    (png,) = pngs(tmp_path / "o")
    assert (meta(png)["prompt"], meta(png)["seed"]) == ("a boat", "9")


def test_d_minus_1_is_a_random_seed_and_raw_prompt_drops_d(tiny_models, tmp_path):
    """`--d -1,7` with 3 images: a drawn seed, 7, then 7 again (the last value repeats); a line
    without `--d` draws the same way, so `--seed` makes the drawn seed reproducible."""
    lines = tmp_path / "p.txt"
    lines.write_text("a cat --d -1,7 --n dog\na cat --n dog\n")
    common = ["--from_file", str(lines), "--images_per_prompt", "3", "--seed", "4", "--sequential_file_name"]
    assert run(tiny_models, tmp_path / "o", *common) == 0
    files = pngs(tmp_path / "o")
    seeds = [int(meta(p)["seed"]) for p in files]
    assert seeds[1:3] == [7, 7] and seeds[0] not in (7, -1)
    assert 0 <= seeds[0] < 2**32 and len(set(seeds[3:] + [seeds[0]])) == 4  # four different draws
    assert [meta(p)["raw-prompt"] for p in files] == ["a cat --n dog"] * 6
    assert run(tiny_models, tmp_path / "again", *common) == 0  # --seed: the same draws
    assert [int(meta(p)["seed"]) for p in pngs(tmp_path / "again")] == seeds
    assert np.array_equal(pixels(files[0]), pixels(pngs(tmp_path / "again")[0]))
    repeat = tmp_path / "r.txt"
    repeat.write_text("a cat --d -1\n")
    assert run(tiny_models, tmp_path / "r", "--from_file", str(repeat), "--images_per_prompt", "2") == 0
    drawn = [int(meta(p)["seed"]) for p in pngs(tmp_path / "r")]
    assert len(set(drawn)) == 2 and -1 not in drawn  # a repeated -1 draws again


def test_without_seeds_drops_only_d():
    from library.prompts.line_options import without_seeds

    assert without_seeds("a cat --d 1 --n dog") == "a cat --n dog"
    assert without_seeds("a cat --n dog --D 1,2") == "a cat --n dog"
    assert without_seeds("a {x --d 1|y} --d -1 --s 5") == "a {x --d 1|y} --s 5"
    assert without_seeds("a cat --dsd1 2") == "a cat --dsd1 2"


def test_lora_with_a_mask_is_a_region_mask_unless_inpaint_with_networks(tiny_models, tmp_path, caplog):
    """The original's inpainting script with a LoRA loaded: the mask is the LoRA's region mask
    (one warning naming --inpaint_with_networks); with that option it is the inpainting mask: the
    kept half is the source's, as without networks, and the repainted half has the LoRA."""
    from tests.helpers import make_source

    source = make_source(tmp_path / "src.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # repaint the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    lora = ["--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"])]
    common = ["--image_path", str(source), "--mask_path", str(tmp_path / "mask.png"), "--strength", "1"]
    with caplog.at_level(logging.WARNING):
        regional = _image(tiny_models, tmp_path / "regional", *common, *lora)
    assert _warnings(caplog) == ["--mask_path with --network_module is the networks' region mask (as the original), "
                                 "not an inpainting mask: a prompt without ' AND ' parts is drawn inside the mask's "
                                 "first region only; to inpaint with networks loaded, add --inpaint_with_networks"]
    assert "Region mask: mask.png" in meta(pngs(tmp_path / "regional")[0])["parameters"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inpainted = _image(tiny_models, tmp_path / "inpaint", *common, *lora, "--inpaint_with_networks")
    assert _warnings(caplog) == []
    assert "Region mask" not in meta(pngs(tmp_path / "inpaint")[0])["parameters"]
    plain = _image(tiny_models, tmp_path / "plain", *common)  # inpainting without networks
    assert np.abs(inpainted[:, 40:] - plain[:, 40:]).max() <= 1  # the kept half: the source's, either way
    assert np.abs(inpainted[:, :24] - plain[:, :24]).max() > 10  # the repainted half has the LoRA
    assert np.abs(regional[:, 40:] - plain[:, 40:]).max() > 10  # the region mask inpaints nothing


@pytest.mark.parametrize("extra,message", [
    (["--inpaint_with_networks", "--mask_path", "m.png", "--image_path", "s.png"],
     "--inpaint_with_networks needs --network_module, --image_path and --mask_path (the inpainting mask)"),
    (["--inpaint_with_networks", "--attention_couple", "--mask_path", "m.png"],
     "--inpaint_with_networks and --attention_couple exclude each other (an inpainting mask or a region mask)"),
])
def test_inpaint_with_networks_option_errors(extra, message, capsys):
    from library.cli.parser import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--prompt", "x", *extra])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"gen_img.py: error: {message} (see --help)\n"


@pytest.mark.parametrize("option", ["--clip_vision_strength 0", "--clip_vision_strength 0.0",
                                    "--control_net_lllite_models"])
def test_sdxl_only_options_given_0_or_empty_are_refused(option, capsys):
    """0 equals False in Python; an SDXL-only option given with 0 is refused like any other value."""
    from library.cli.parser import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--prompt", "x", *option.split()])
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"gen_img.py: error: {option.split()[0]}: not supported yet (SDXL's CLIP "
                                       "Vision and ControlNet-LLLite); leave it out (see --help)\n")


def test_and_parts_with_an_inpainting_mask_name_attention_couple(tiny_models, tmp_path, caplog, capsys):
    from library.cli.parser import parse_args
    from tests.helpers import make_source

    source = make_source(tmp_path / "src.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "a cat AND a dog", "--mask_path", str(tmp_path / "mask.png")])
    assert capsys.readouterr().err == (
        "gen_img.py: error: --mask_path needs --image_path (the images to inpaint), or --attention_couple to read it "
        "as the region mask of the prompt's ' AND ' parts (see --help)\n")
    with caplog.at_level(logging.WARNING):
        _image(tiny_models, tmp_path / "o", "--image_path", str(source), "--mask_path", str(tmp_path / "mask.png"),
               "--prompt", "a cat AND a dog --d 5")
    assert _warnings(caplog) == ["the prompt's ' AND ' parts share the whole image: --mask_path is the inpainting "
                                 "mask here (no networks loaded); add --attention_couple to make it the parts' "
                                 "region mask"]


@pytest.mark.parametrize("kind", ["sd1", "sd1-diffusers"])
@pytest.mark.parametrize("extra,message", [
    (["--W", "8"], "--W 8: this model makes 16 to 8192 pixels a side"),
    (["--clip_skip", "4"], "--clip_skip 4: the text encoder has only 3 layers; use 1 to 3"),
    (["--ds_depth_1", "0", "--ds_depth_2", "2"],
     "Deep Shrink depth 2 (--ds_depth_2/--dsd2) 2: this U-Net's down blocks are 0 to 1"),
])
def test_checks_from_the_header_come_before_the_model_loads(tiny_models, tmp_path, capsys, monkeypatch, kind,
                                                           extra, message):
    """The safetensors header (or the Diffusers folder's configs) tells the U-Net's smallest size,
    the text encoder's layers and the U-Net's depths: the mistake is found with no weight read."""
    import gen_img
    from library.models import checkpoint, loader

    def opened(*args, **kwargs):
        raise AssertionError("the model file was opened for loading")

    monkeypatch.setattr(checkpoint, "read_state_dict", opened)
    monkeypatch.setattr(loader, "load_model", opened)
    monkeypatch.setattr(loader, "_load_diffusers_folder", opened)
    code = gen_img.main(["--ckpt", str(tiny_models[kind]), "--outdir", str(tmp_path / "o"), "--prompt", "x", *extra])
    assert (code, capsys.readouterr().err) == (2, f"gen_img.py: error: {message}\n")
    assert not (tmp_path / "o").exists()


def test_progress_total_counts_the_expanded_images(tiny_models, tmp_path, caplog):
    """`{e$$...}` makes one prompt per alternative: the total is images, not lines."""
    from library.prompts.sources import Line, images_per_line

    assert images_per_line(Line("a {e$$red|green|blue} house at {e$$day|night} --n x", "p:1"), 2) == 12
    assert images_per_line(Line("a {red|green} house --w 12", "p:2"), 3) == 3  # random groups, a bad option
    with caplog.at_level(logging.INFO, logger="library.progress"):
        assert run(tiny_models, tmp_path / "o", "--prompt", "a {e$$red|green} house --d 1", "--steps", "1") == 0
    assert len(pngs(tmp_path / "o")) == 2
    assert [r.getMessage().split(",")[0] for r in caplog.records if r.getMessage().startswith("images ")] == [
        "images 1/2", "images 2/2"]
