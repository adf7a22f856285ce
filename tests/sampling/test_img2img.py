"""img2img and inpainting through the real command and the Pipeline, on the tiny model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from library.features.inpainting import Inpainting
from library.images.input_images import pil_to_tensor
from library.images.metadata import read_generation_text
from library.models import load_model
from library.records.jobs import Job
from library.sampling.img2img import Img2ImgInput, first_step, steps_to_run
from library.sampling.patches import FixedFeature
from library.sampling.pipeline import Pipeline
from library.sampling.schedulers import make_scheduler
from tests.helpers import StepRecorder, img2img_error, make_pipeline, make_source, pixels, pngs
from tests.helpers import run_img2img as run


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["sd1"]))


def round_trip(pipeline: Pipeline, source: torch.Tensor, seed: int, steps: int, per_step: int = 1) -> torch.Tensor:
    """decode(encode(source).sample(g)) with g advanced past draws (1)-(3) of `library.prompts.seeds`."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, source.shape[2] // 8, source.shape[3] // 8)
    for _ in range(1 + steps * per_step + 1):
        torch.randn(shape, generator=g)
    with torch.no_grad():
        latents = pipeline.vae.encode(source).latent_dist.sample(generator=g) * pipeline.vae.config.scaling_factor
    return pipeline.decode(latents, 1)


# --- strength ------------------------------------------------------------------------------------


def test_strength_0_returns_the_vae_round_trip(model, tiny_models, tmp_path):
    pipeline = make_pipeline(model, "ddim")
    src = make_source(tmp_path / "src.png", (64, 96))
    expected = round_trip(pipeline, pil_to_tensor(Image.open(src)), seed=11, steps=6)
    # with the original's default offset 1 strength 0 noises at the last timestep; offset 0: none
    assert run(tiny_models, tmp_path / "out", "--image_path", str(src), "--strength", "0", "--prompt", "x --d 11",
               "--force_scheduler_zero_steps_offset") == 0
    (out,) = pngs(tmp_path / "out")
    want = np.asarray(((expected[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().numpy(), dtype=np.int16)
    assert np.abs(pixels(out) - want).max() <= 1
    assert read_generation_text(out)["parameters"].endswith("Denoising strength: 0")


def test_strength_1_ignores_the_source(tiny_models, tmp_path):
    a, b = make_source(tmp_path / "a.png", seed=1), make_source(tmp_path / "b.png", seed=2)
    prompt = ["--prompt", "a house --d 5", "--sampler", "euler_a"]
    assert run(tiny_models, tmp_path / "txt", *prompt, "--W", "64", "--H", "64") == 0
    for name, src in (("a", a), ("b", b)):
        assert run(tiny_models, tmp_path / name, *prompt, "--image_path", str(src), "--strength", "1") == 0
    txt = pixels(pngs(tmp_path / "txt")[0])
    assert np.array_equal(pixels(pngs(tmp_path / "a")[0]), txt)
    assert np.array_equal(pixels(pngs(tmp_path / "b")[0]), txt)


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("euler", 1), ("dpmsolver++", 1), ("heun", 2)])
def test_steps_run_are_the_tail_that_strength_selects(model, sampler, order):
    pipeline = make_pipeline(model, sampler)
    calls: list[int] = []
    pipeline.patches.add(FixedFeature(StepRecorder(lambda i, t: calls.append(t))))
    source = torch.zeros(1, 3, 32, 32)
    for steps, strength in ((10, 0.55), (10, 0.3), (7, 1.0), (12, 0.999), (5, 0.1)):
        calls.clear()
        job = Job("x", "", seed=1, width=32, height=32, steps=steps, scale=4.0, strength=strength)
        pipeline.latents([job], Img2ImgInput(strength, images=source))
        n = steps_to_run(steps, strength)
        assert n == int(steps * strength)
        assert len(calls) == (2 * n - 1 if order == 2 and n else n), (steps, strength)
        schedule = make_scheduler(sampler, False)
        schedule.set_timesteps(steps)
        assert calls == [int(t) for t in schedule.timesteps[first_step(steps, strength) * order:]]


def test_every_sampler_runs_img2img_and_inpainting(model, tmp_path):
    from library.records.samplers import sampler_names

    source = pil_to_tensor(Image.open(make_source(tmp_path / "s.png", (32, 32))))
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 1:3, 1:3] = 1
    for sampler in [n for n in sampler_names() if not n.startswith("k_") and not n.endswith("_karras")]:
        pipeline = make_pipeline(model, sampler, Inpainting())
        job = Job("x", "", seed=2, width=32, height=32, steps=4, scale=4.0, strength=0.5)
        for init in (Img2ImgInput(0.5, images=source), Img2ImgInput(0.5, images=source, masks=masks)):
            latents = pipeline.latents([job], init)
            assert latents.shape == (1, 4, 4, 4) and torch.isfinite(latents).all(), sampler
        # outside the mask the latents end as the source's exactly
        assert torch.allclose(latents[..., 0, :], init.source_latents[..., 0, :]), sampler


def test_cli_strength_and_the_t_prompt_option(tiny_models, tmp_path, call_log):
    src = make_source(tmp_path / "s.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("first --d 1\nsecond --t 0.3 --d 2\n")
    assert run(tiny_models, tmp_path / "o", "--image_path", str(src), "--from_file", str(prompts),
               "--steps", "10", "--strength", "0.55") == 0
    assert [(e["steps"], e["strength"], e["ran"]) for e in call_log] == [(10, 0.55, 5), (10, 0.3, 3)]


# --- sources: order, sizes, names, metadata ---------------------------------------------------------


def test_folder_sources_are_used_in_turn_across_prompts(tiny_models, tmp_path):
    folder = tmp_path / "src"
    for i, width in enumerate((64, 96, 128)):  # the size tells which source an image used
        make_source(folder / f"{i:02d}.png", (width, 64), seed=i)
    (folder / "notes.txt").write_text("not an image")
    prompts = tmp_path / "p.txt"
    prompts.write_text("alpha\nbeta\n")
    out = tmp_path / "out"
    assert run(tiny_models, out, "--image_path", str(folder), "--from_file", str(prompts), "--images_per_prompt", "2",
               "--sequential_file_name", "--batch_size", "2") == 0
    files = pngs(out)
    assert [p.name for p in files] == [f"im_{i:06d}.png" for i in range(1, 5)]
    assert [Image.open(p).size[0] for p in files] == [64, 96, 128, 64]
    assert [read_generation_text(p)["prompt"] for p in files] == ["alpha", "alpha", "beta", "beta"]


def test_batches_do_not_change_img2img_images(tiny_models, tmp_path):
    folder = tmp_path / "src"
    for i in range(3):
        make_source(folder / f"{i}.png", seed=i)
    common = ["--image_path", str(folder), "--prompt", "x", "--images_per_prompt", "3", "--seed", "4",
              "--sampler", "euler_a", "--strength", "0.7", "--use_original_file_name"]
    assert run(tiny_models, tmp_path / "b1", *common, "--batch_size", "1") == 0
    assert run(tiny_models, tmp_path / "b3", *common, "--batch_size", "3") == 0
    one, three = pngs(tmp_path / "b1"), pngs(tmp_path / "b3")
    assert [p.name for p in one] == [p.name for p in three] == ["0.png", "1.png", "2.png"]
    for p, q in zip(one, three):
        assert np.abs(pixels(p) - pixels(q)).max() <= 1


def test_prompts_come_from_the_sources_metadata(tiny_models, tmp_path):
    made = tmp_path / "made"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube --n blurry --w 64 --d 1\na blue ball --w 96 --d 2\n")
    assert run(tiny_models, made, "--from_file", str(prompts), "--H", "64", "--sequential_file_name") == 0
    out = tmp_path / "out"
    assert run(tiny_models, out, "--image_path", str(made), "--images_per_prompt", "2", "--strength", "0.5",
               "--sequential_file_name") == 0
    got = [(read_generation_text(p)["prompt"], read_generation_text(p).get("negative-prompt"), Image.open(p).size[0])
           for p in pngs(out)]
    # each source's prompt, twice, each time with its own source (the widths tell)
    assert got == [("a red cube", "blurry", 64)] * 2 + [("a blue ball", "", 96)] * 2


def test_size_is_rounded_down_or_resized(tiny_models, tmp_path, caplog):
    src = make_source(tmp_path / "odd.png", (70, 61), mode="RGBA")
    with caplog.at_level(logging.INFO, logger="library.sampling.img2img"):
        assert run(tiny_models, tmp_path / "a", "--image_path", str(src), "--prompt", "x") == 0
    assert Image.open(pngs(tmp_path / "a")[0]).size == (64, 32)  # multiples of 32, as the original
    assert "odd.png: 70x61 rounded down to 64x32 (multiples of 32, as the original)" in caplog.text
    assert run(tiny_models, tmp_path / "b", "--image_path", str(src), "--prompt", "x", "--W", "96", "--H", "64") == 0
    assert Image.open(pngs(tmp_path / "b")[0]).size == (96, 64)
    assert run(tiny_models, tmp_path / "c", "--image_path", str(src), "--prompt", "x --w 32") == 0
    assert Image.open(pngs(tmp_path / "c")[0]).size == (32, 32)


# --- inpainting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", ["0.6", "1"])
def test_inpainting_keeps_the_area_outside_the_mask(tiny_models, tmp_path, strength):
    src = make_source(tmp_path / "src.png", (64, 64), seed=3)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 24:48] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    common = ["--image_path", str(src), "--prompt", "x --d 9"]
    # the VAE round-trip: strength 0 with offset 0 (offset 1 would noise it at the last timestep)
    assert run(tiny_models, tmp_path / "rt", *common, "--strength", "0", "--force_scheduler_zero_steps_offset") == 0
    assert run(tiny_models, tmp_path / "in", *common, "--strength", strength, "--mask_image",
               str(tmp_path / "mask.png")) == 0
    diff = np.abs(pixels(pngs(tmp_path / "in")[0]) - pixels(pngs(tmp_path / "rt")[0])).max(axis=2)
    assert diff[mask == 0].max() <= 2
    assert diff[mask == 255].mean() > 10  # the square was repainted


def test_mask_folder_masks_belong_to_sources_in_order(tiny_models, tmp_path):
    for i in range(2):
        make_source(tmp_path / "src" / f"{i}.png", seed=i)
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 64), 0).save(tmp_path / "masks" / "0.png")  # keep everything
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "1.png")  # repaint everything
    assert run(tiny_models, tmp_path / "rt", "--image_path", str(tmp_path / "src"), "--prompt", "x --d 3,3",
               "--images_per_prompt", "2", "--strength", "0", "--sequential_file_name",
               "--force_scheduler_zero_steps_offset") == 0
    assert run(tiny_models, tmp_path / "in", "--image_path", str(tmp_path / "src"), "--prompt", "x --d 3,3",
               "--images_per_prompt", "2", "--mask_path", str(tmp_path / "masks"), "--sequential_file_name") == 0
    (kept, painted), (rt0, rt1) = pngs(tmp_path / "in"), pngs(tmp_path / "rt")
    assert np.abs(pixels(kept) - pixels(rt0)).max() <= 2
    assert np.abs(pixels(painted) - pixels(rt1)).mean() > 10


# --- errors ---------------------------------------------------------------------------------------


def test_unreadable_source_stops_before_any_output(tiny_models, tmp_path, capsys):
    make_source(tmp_path / "src" / "0.png")
    (tmp_path / "src" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = img2img_error(tiny_models, tmp_path, capsys, "--image_path", str(tmp_path / "src"), "--prompt", "x")
    assert "1.png: not an image or damaged" in err


def test_mask_of_another_size_names_both_sizes(tiny_models, tmp_path, capsys):
    src = make_source(tmp_path / "s.png", (64, 64))
    Image.new("L", (64, 32), 255).save(tmp_path / "m.png")
    err = img2img_error(tiny_models, tmp_path, capsys, "--image_path", str(src), "--mask_path", str(tmp_path / "m.png"),
                        "--prompt", "x")
    assert f"--mask_path {tmp_path / 'm.png'} is 64x32 but its image {src} is 64x64" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--image_path", "{empty}", "--prompt", "x"], "the folder has no .png/.jpg/.jpeg/.webp images"),
        (["--image_path", "{tmp}/nope.png", "--prompt", "x"], "nope.png: no such file or folder"),
        (["--image_path", "{src}"], "the image has no prompt in its metadata; give --prompt"),
        (["--mask_path", "{src}", "--prompt", "x"], "--mask_path needs --image_path"),
        (["--image_path", "{tiny}", "--prompt", "x"], "4x12 pixels; a source used at its own size needs at least 8 pixels a side"),
        (["--image_path", "{src}", "--prompt", "x", "--strength", "1.5"], "--strength 1.5: must be between 0 and 1"),
    ],
)
def test_img2img_mistakes_are_one_line(tiny_models, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    src = make_source(tmp_path / "plain.png")
    tiny = make_source(tmp_path / "tiny.png", (4, 12))
    values = {"empty": str(tmp_path / "empty"), "tmp": str(tmp_path), "src": str(src), "tiny": str(tiny)}
    err = img2img_error(tiny_models, tmp_path, capsys, *[e.format(**values) for e in extra])
    assert message in err
