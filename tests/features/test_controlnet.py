"""ControlNet guidance: preprocessing, turns and ratios, the loop, guide images, the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.features.controlnet import (
    BatchControl,
    ControlNets,
    ControlUnit,
    Prep,
    hint_array,
    hint_tensor,
    parse_prep,
    per_model,
)
from library.images.input_images import GuideImages
from library.models import load_model
from library.records.jobs import Job
from library.sampling.patches import BatchLayout, StepContext
from library.text.encoder import Conditioning
from tests.helpers import make_pipeline, meta, pixels, pngs, run


def test_parse_prep_exact() -> None:
    assert parse_prep("none") == Prep("none")
    assert parse_prep("canny") == Prep("canny", 100, 200)
    assert parse_prep("canny_63_191") == Prep("canny", 63, 191)
    assert parse_prep("CANNY_1_2").label == "canny_1_2"
    assert parse_prep("None").label == "none"
    for bad, message in (
        ("sobel", "--control_net_preps sobel: unknown preprocessing; use none, canny or canny_LOW_HIGH (e.g. canny_63_191)"),
        ("canny_5", "--control_net_preps canny_5: unknown preprocessing; use none, canny or canny_LOW_HIGH (e.g. canny_63_191)"),
        ("canny_200_100", "--control_net_preps canny_200_100: the first threshold must not exceed the second"),
    ):
        with pytest.raises(UserError) as info:
            parse_prep(bad)
        assert str(info.value) == message


def _picture(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), np.uint8)
    array[10:30, 12:36] = 255  # a white box: clear edges
    array += rng.integers(0, 20, size=array.shape, dtype=np.uint8)
    return Image.fromarray(array)


def test_hint_is_resized_first_then_canny() -> None:
    picture = _picture()
    hint = hint_array(picture, Prep("canny", 63, 191), 64, 32)
    resized = np.asarray(picture.resize((64, 32), Image.Resampling.LANCZOS))
    expected = cv2.Canny(resized, 63, 191)
    assert hint.shape == (32, 64, 3) and hint.dtype == np.uint8
    assert np.array_equal(hint[:, :, 0], expected) and np.array_equal(hint[:, :, 2], expected)
    assert 0 < int((expected > 0).sum()) < expected.size // 2
    assert np.array_equal(hint_array(picture, Prep("none"), 48, 40), np.asarray(picture))


def test_hint_tensor_is_rgb_in_0_1() -> None:
    arrays = [np.full((8, 16, 3), 255, np.uint8), np.zeros((8, 16, 3), np.uint8)]
    tensor = hint_tensor(arrays)
    assert tensor.shape == (2, 3, 8, 16) and tensor.dtype == torch.float32
    assert tensor[0].min() == 1.0 and tensor[1].max() == 0.0


def test_units_take_turns_within_their_ratios() -> None:
    units = [ControlUnit(None, "a", Prep("none"), 1.0, 1.0), ControlUnit(None, "b", Prep("none"), 1.0, 0.5)]
    nets = ControlNets(units)
    assert [nets.unit_at(i, 10) for i in range(10)] == [0, 1, 0, 1, 0, None, 0, None, 0, None]
    assert [ControlNets(units[:1]).unit_at(i, 4) for i in range(4)] == [0, 0, 0, 0]
    zero = ControlNets([ControlUnit(None, "a", Prep("none"), 0.0, 1.0)])
    assert zero.unit_at(0, 4) is None  # weight 0: the ControlNet is not even run
    assert ControlNets([ControlUnit(None, "a", Prep("none"), 1.0, 0.0)]).unit_at(0, 4) is None


def test_per_model_values() -> None:
    assert per_model(None, 3, 1.0) == [1.0, 1.0, 1.0]
    assert per_model([0.5], 2, 1.0) == [0.5, 1.0]  # the first model's, as the original
    assert per_model([0.5, 0.7], 2, 1.0) == [0.5, 0.7]
    with pytest.raises(ValueError, match="3 values for 2 ControlNets"):  # the command line refuses this first
        per_model([0.5, 0.7, 0.8], 2, 1.0)


def test_guide_images_are_used_in_turn(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "10.png"):
        _picture().save(tmp_path / name)
    guides = GuideImages(str(tmp_path))
    assert [Path(guides.next_path()).name for _ in range(4)] == ["10.png", "a.png", "b.png", "10.png"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="x.png"):
        GuideImages(str(tmp_path / "bad"))


# --- in the loop, with an in-memory ControlNet made from the tiny U-Net ---------------------------


@pytest.fixture(scope="module")
def controlnet(sd1):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(sd1.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)


def _guide(tmp_path: Path) -> str:
    path = tmp_path / "guide.png"
    _picture(64, 64).save(path)
    return str(path)


def _latents(sd1, controlnet, jobs, weight=1.0, ratio=1.0, prep="canny", sampler="ddim"):
    pipeline = make_pipeline(sd1, sampler)
    calls = []
    if controlnet is not None:
        pipeline.patches.add(ControlNets([ControlUnit(controlnet, "net", parse_prep(prep), weight, ratio)]))
        handle = controlnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        return pipeline.latents(jobs), len(calls)
    finally:
        if controlnet is not None:
            handle.remove()


def _job(guide: str | None, seed: int = 3) -> Job:
    return Job("a cat", "", seed=seed, width=64, height=64, steps=4, scale=5.0, guide_image=guide)


def test_controlnet_changes_the_image_and_weight_or_ratio_0_do_not(sd1, controlnet, tmp_path):
    guide = _guide(tmp_path)
    plain, _ = _latents(sd1, None, [_job(None)])
    guided, calls = _latents(sd1, controlnet, [_job(guide)])
    assert calls == 4
    assert (guided - plain).abs().max() > 1e-3
    for weight, ratio in ((0.0, 1.0), (1.0, 0.0)):
        same, calls = _latents(sd1, controlnet, [_job(guide)], weight=weight, ratio=ratio)
        assert calls == 0 and torch.equal(same, plain)
    no_guide, calls = _latents(sd1, controlnet, [_job(None)])  # a job without a guide: no ControlNet
    assert calls == 0 and torch.equal(no_guide, plain)


def test_ratio_counts_unet_calls(sd1, controlnet, tmp_path):
    guide = _guide(tmp_path)
    _, calls = _latents(sd1, controlnet, [_job(guide)], ratio=0.5)
    assert calls == 2
    _, calls = _latents(sd1, controlnet, [_job(guide)], ratio=0.5, sampler="heun")  # 2 calls a step but the last
    assert calls == 4  # 7 U-Net calls, the first ceil(3.5)


def test_img2img_ratio_counts_the_calls_it_runs(sd1, controlnet, tmp_path):
    from library.sampling.img2img import Img2ImgInput

    pipeline = make_pipeline(sd1, "ddim")
    pipeline.patches.add(ControlNets([ControlUnit(controlnet, "net", Prep("none"), 1.0, 0.5)]))
    calls = []
    handle = controlnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        job = replace(_job(_guide(tmp_path)), steps=8, strength=0.5)
        pipeline.latents([job], Img2ImgInput(0.5, latents=torch.zeros(1, 4, 8, 8)))
    finally:
        handle.remove()
    assert len(calls) == 2  # 4 of 8 steps run, the ControlNet in the first half of them


def test_controlnet_batches_do_not_change_images(sd1, controlnet, tmp_path):
    guide = _guide(tmp_path)
    other = tmp_path / "other.png"
    _picture(64, 64, seed=5).transpose(Image.Transpose.ROTATE_90).save(other)
    jobs = [_job(guide, seed=3), _job(str(other), seed=4)]
    together, _ = _latents(sd1, controlnet, jobs)
    alone = torch.cat([_latents(sd1, controlnet, [job])[0] for job in jobs])
    assert (together - alone).abs().max() < 1e-4


def test_cfg_copies_all_get_the_hint(controlnet) -> None:
    nets = ControlNets([ControlUnit(controlnet, "net", Prep("none"), 1.0, 1.0)])
    control = BatchControl(nets, [torch.rand(6, 3, 64, 64)])  # 2 images x 3 copies (negative scale)
    ctx = StepContext(0, 4, 999, None, BatchLayout(2, 3, 8, 8))
    kwargs = control.unet_kwargs(ctx, torch.randn(6, 4, 8, 8), torch.tensor(999), Conditioning(torch.randn(6, 77, 32)))
    assert kwargs["mid_block_additional_residual"].shape[0] == 6
    assert len(kwargs["down_block_additional_residuals"]) == len(controlnet.controlnet_down_blocks)


def test_highres_disable_control_net_drops_the_guide_of_the_2nd_stage() -> None:
    from library.sampling.highres_fix import HighresFix, HighresSettings

    job = replace(_job("g.png"), width=128, height=128)
    first, second = HighresFix(HighresSettings(0.5)).stages(job)
    assert (first.guide_image, second.guide_image) == ("g.png", "g.png")
    first, second = HighresFix(HighresSettings(0.5, control_net_2nd=False)).stages(job)
    assert (first.guide_image, second.guide_image) == ("g.png", None)


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--control_net_models", "c.safetensors"],
     "--control_net_models needs --guide_image_path (the hint image or folder)"),
    (["--guide_image_path", "g.png"],
     "--guide_image_path needs --control_net_models, --clip_image_guidance_scale or --vgg16_guidance_scale"),
    (["--control_net_weights", "0.5"], "--control_net_weights needs --control_net_models"),
    (["--control_net_models", "a", "b", "--guide_image_path", "g", "--control_net_ratios", "1", "2", "3"],
     "--control_net_ratios has 3 values but --control_net_models has 2; give at most one per model (missing ones "
     "take the defaults)"),
    (["--control_net_models", "a", "--guide_image_path", "g", "--control_net_ratios", "1.5"],
     "--control_net_ratios 1.5: must be between 0 and 1"),
])
def test_bad_controlnet_options_are_one_line_errors(extra, message, capsys) -> None:
    from library.cli.parser import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--prompt", "x", *extra])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"gen_img.py: error: {message} (see --help)\n"


# --- end to end, with the tiny ControlNet files -----------------------------------------------------


def _cli_guide(tmp_path: Path) -> Path:
    path = tmp_path / "guide.png"
    _picture(64, 64).save(path)
    return path


def test_cli_controlnet_changes_the_image_and_weight_0_does_not(tiny_models, tmp_path, capsys):
    guide = str(_cli_guide(tmp_path))
    net = str(tiny_models["controlnet-sd1"])
    common = ["--prompt", "a cat", "--seed", "7"]
    assert run(tiny_models, tmp_path / "plain", *common) == 0
    assert run(tiny_models, tmp_path / "cn", *common, "--control_net_models", net, "--guide_image_path", guide,
               "--control_net_preps", "canny_63_191") == 0
    assert run(tiny_models, tmp_path / "w0", *common, "--control_net_models", net, "--guide_image_path", guide,
               "--control_net_weights", "0") == 0
    plain, guided, off = (pngs(tmp_path / d)[0] for d in ("plain", "cn", "w0"))
    assert np.abs(pixels(plain) - pixels(guided)).max() > 10
    assert np.array_equal(pixels(plain), pixels(off))
    parameters = meta(guided)["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: tiny-controlnet-sd1.safetensors, Weight: 1, Threshold A: 63, '
            'Threshold B: 191, Guidance Start: 0, Guidance End: 1"') in parameters


def test_cli_two_controlnets_in_turn_and_batches(tiny_models, tmp_path):
    guides = tmp_path / "guides"
    guides.mkdir()
    _picture(64, 64, seed=1).save(guides / "a.png")
    _picture(64, 64, seed=2).transpose(Image.Transpose.ROTATE_90).save(guides / "b.png")
    options = ["--prompt", "a cat", "--images_per_prompt", "2", "--seed", "11",
               "--control_net_models", str(tiny_models["controlnet-sd1"]), str(tiny_models["controlnet-sd1-diff"]),
               "--control_net_preps", "canny", "none", "--control_net_ratios", "1", "0.5",
               "--guide_image_path", str(guides)]
    assert run(tiny_models, tmp_path / "b1", *options) == 0
    assert run(tiny_models, tmp_path / "b2", *options, "--batch_size", "2") == 0
    one, two = pngs(tmp_path / "b1"), pngs(tmp_path / "b2")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(one[0]) - pixels(one[1])).max() > 10  # other seed and other guide


def test_cli_controlnet_with_highres_fix_and_its_disable_switch(tiny_models, tmp_path):
    guide = str(_cli_guide(tmp_path))
    options = ["--prompt", "a cat", "--seed", "5", "--W", "128", "--H", "96", "--highres_fix_scale", "0.5",
               "--highres_fix_steps", "3", "--strength", "0.6",
               "--control_net_models", str(tiny_models["controlnet-sd1"]), "--guide_image_path", guide]
    assert run(tiny_models, tmp_path / "both", *options) == 0
    assert run(tiny_models, tmp_path / "first", *options, "--highres_fix_disable_control_net") == 0
    both, first = pngs(tmp_path / "both")[0], pngs(tmp_path / "first")[0]
    assert pixels(both).shape == (96, 128, 3)
    assert np.abs(pixels(both) - pixels(first)).max() > 10


def test_cli_controlnet_of_another_model_is_one_line(tiny_models, tmp_path, capsys):
    guide = str(_cli_guide(tmp_path))
    net = tiny_models["controlnet-sd2"]
    assert run(tiny_models, tmp_path / "o", "--prompt", "x", "--control_net_models", str(net),
               "--guide_image_path", guide) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gen_img.py: error: --control_net_models {net}: this ControlNet does not fit the model")
    assert err.count("\n") == 1
    assert not pngs(tmp_path / "o")


def test_cli_xti_with_controlnet_gives_the_images_of_the_words(tiny_models, tmp_path):
    """XTI + ControlNet composes: an XTI word whose every layer holds the vectors of "cat" gives
    the image of the word "cat" with the same ControlNet; other vectors change the image."""
    from library.text.embeddings import write_xti

    model = load_model(str(tiny_models["sd1"]))
    ids = model.tokenizer("cat", add_special_tokens=False).input_ids
    cat = model.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    layers = ("IN01", "MID", "OUT02", "OUT03")
    same = write_xti(tmp_path / "xcat.safetensors", {name: cat for name in layers})
    other = write_xti(tmp_path / "xdog.safetensors",
                      {name: torch.randn(1, 32, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(layers)})
    control = ["--control_net_models", str(tiny_models["controlnet-sd1"]), "--guide_image_path",
               str(_cli_guide(tmp_path)), "--seed", "3"]
    assert run(tiny_models, tmp_path / "words", "--prompt", "a cat", *control) == 0
    assert run(tiny_models, tmp_path / "same", "--prompt", "a xcat", "--XTI_embeddings", str(same), *control) == 0
    assert run(tiny_models, tmp_path / "other", "--prompt", "a xdog", "--XTI_embeddings", str(other), *control) == 0
    words, xti_same, xti_other = (pixels(pngs(tmp_path / d)[0]) for d in ("words", "same", "other"))
    assert np.array_equal(words, xti_same)
    assert np.abs(xti_other.astype(int) - words).max() > 0


def test_cli_difference_controlnet_equals_the_full_one_with_an_unmerged_lora(tiny_models, tmp_path):
    guide = str(_cli_guide(tmp_path))
    for key in ("controlnet-sd1", "controlnet-sd1-diff"):
        assert run(tiny_models, tmp_path / key, "--prompt", "a cat", "--seed", "3",
                   "--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"]),
                   "--control_net_models", str(tiny_models[key]), "--guide_image_path", guide,
                   "--control_net_preps", "canny") == 0
    full, diff = (pngs(tmp_path / key)[0] for key in ("controlnet-sd1", "controlnet-sd1-diff"))
    assert np.abs(pixels(full) - pixels(diff)).max() <= 1
