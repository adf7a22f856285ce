"""CLIP text, CLIP image and VGG16 guidance on the tiny models: off is off, the gradient is the
loss's, guidance lowers the loss, `--c` is per image, batches do not change images, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import gen_img
from library.features.guidance import ClipGuide, GuidedGeneration, Scales, VggGuide, spherical_loss
from library.models import load_model
from library.models.clip_guidance import config_from_shapes, load_clip_model, tiny_clip_config
from library.models.vgg16 import conv_indices, load_vgg16_features
from library.records.jobs import Job
from library.sampling.patches import Batch, BatchLayout, StepContext
from library.sampling.schedulers import make_scheduler
from library.text.encoder import PromptEncoder
from tests.helpers import make_pipeline, make_source, meta, pixels, pngs, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip(tiny_models, sd1):
    return ClipGuide(load_clip_model(str(tiny_models["clip"]), CPU, torch.float32), sd1.tokenizer)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("guide") / "guide.png", seed=3)


def _job(prompt: str = "a red car", seed: int = 1, **extra) -> Job:
    return Job(prompt, "", seed=seed, width=64, height=64, steps=5, scale=5.0, **extra)


def _final_clip_loss(model, clip: ClipGuide, sampler: str, scale: float, job: Job) -> float:
    pipeline = make_pipeline(model, sampler)
    if scale:
        pipeline.patches.add(GuidedGeneration(model.vae, Scales(clip_text=scale), clip))
    image = (pipeline.decode(pipeline.latents([job]), 1) / 2 + 0.5).clamp(0, 1)
    with torch.no_grad():
        return float(clip.loss(image, clip.text_features(job), 1.0))


# --- the models ----------------------------------------------------------------------------------


def test_tiny_models_load_from_folder_and_single_file(tiny_models, clip):
    single = load_clip_model(str(tiny_models["clip-file"]), CPU, torch.float32)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    a = clip.model.get_image_features(pixel_values=x).pooler_output
    b = single.get_image_features(pixel_values=x).pooler_output
    assert a.shape == (1, 16)
    assert torch.allclose(a, b, atol=1e-5)
    inferred = config_from_shapes(single.state_dict())
    expected = tiny_clip_config()
    for tower in ("text_config", "vision_config"):
        for key, value in expected[tower].items():
            assert inferred[tower][key] == value, (tower, key)
    vgg = load_vgg16_features(str(tiny_models["vgg16"]), CPU, torch.float32)
    assert len(vgg) == 31 and conv_indices() == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert vgg[:21](torch.zeros(1, 3, 16, 16)).shape == (1, 16, 2, 2)  # layer 20 = ReLU after conv4_2


def test_clip_text_is_the_prompt_without_weights_cut_to_77_tokens(clip, sd1):
    tok = sd1.tokenizer
    plain = clip.token_ids("a red car", weighted=False)
    assert clip.token_ids("a (red:1.3) car", weighted=True) == plain
    assert plain[:5] == [49406, *tok("a red car", add_special_tokens=False).input_ids, 49407]
    assert len(plain) == 77 and plain[5:] == [tok.pad_token_id] * 72
    long = clip.token_ids("cat " * 100, weighted=True)
    cat = tok("cat", add_special_tokens=False).input_ids
    assert len(long) == 77 and long[-1] == 49407 and long[1:76] == cat * 75
    assert float(spherical_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(
        2 * np.arcsin(2**0.5 / 2) ** 2)


# --- off is off ----------------------------------------------------------------------------------


def test_scale_0_equals_off_bit_for_bit(tiny_models, tmp_path):
    common = ("--prompt", "a red car --n blur", "--seed", "3", "--sampler", "euler_a")
    assert run(tiny_models, tmp_path / "off", *common) == 0
    assert run(tiny_models, tmp_path / "zero", *common, "--clip_guidance_scale", "0", "--vgg16_guidance_scale", "0",
               "--clip_image_guidance_scale", "0", "--clip_model", "/nowhere") == 0
    (off,), (zero,) = pngs(tmp_path / "off"), pngs(tmp_path / "zero")
    assert np.array_equal(pixels(off), pixels(zero))


# --- the gradient --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,kind", [("ddim", "CLIP"), ("ddim", "VGG16"), ("euler", "CLIP"), ("lms", "VGG16")])
def test_gradient_matches_finite_differences(tiny_models, guide, sampler, kind):
    """In float64: d loss / d x from autograd against a central difference along a random direction."""
    model = load_model(str(tiny_models["sd1"]))
    unet, vae = model.unet.double(), model.vae.double()
    clip = ClipGuide(load_clip_model(str(tiny_models["clip"]), CPU, torch.float64), model.tokenizer)
    vgg = VggGuide(load_vgg16_features(str(tiny_models["vgg16"]), CPU, torch.float64), 20)
    job = _job(guide_image=str(guide))
    scheduler = make_scheduler(sampler, False)
    scheduler.set_timesteps(5)
    batch = Batch((job,), BatchLayout(1, 2, 8, 8), scheduler, scheduler.timesteps, CPU, torch.float64)
    feature = GuidedGeneration(vae, Scales(clip_text=100.0, vgg16=100.0), clip, vgg)
    patch = feature.for_batch(batch)
    step = 4
    sigma = float(scheduler.sigmas[step]) if hasattr(scheduler, "sigmas") else None
    ctx = StepContext(step, 5, int(scheduler.timesteps[step]), sigma, batch.layout)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=1)
    states = encoder.conditioning(["", job.prompt], 1).states.double()  # rows [uncond, cond]
    t = scheduler.timesteps[step]

    def call(sample, rows):
        return unet(sample, t, encoder_hidden_states=states[list(rows)]).sample

    target = clip.text_features(job).double() if kind == "CLIP" else vgg.guide_features(str(guide), 64, 64).double()
    pipeline = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=pipeline, dtype=torch.float64) * (sigma if patch.sigma_space else 1.0)
    direction = torch.randn(1, 4, 8, 8, generator=pipeline, dtype=torch.float64)
    g = patch.gradient(ctx, t, x, call, 1, kind, target, 100.0)
    h = 1e-8  # float64: small enough that (almost) no pixel crosses the clamp at 0 or 1
    with torch.no_grad():
        plus = patch.loss(ctx, t, x + h * direction, call, 1, kind, target, 100.0)
        minus = patch.loss(ctx, t, x - h * direction, call, 1, kind, target, 100.0)
    numeric = float((plus - minus) / (2 * h))
    analytic = float((-g * direction).sum())
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-5)


# --- guidance works ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmsolver++"])
def test_guidance_lowers_the_clip_loss_of_the_final_image(sd1, clip, sampler):
    for seed in (1, 2):
        job = _job(seed=seed)
        plain = _final_clip_loss(sd1, clip, sampler, 0.0, job)
        guided = _final_clip_loss(sd1, clip, sampler, 100.0, job)
        assert guided < plain - 0.02, (sampler, seed, plain, guided)


@pytest.mark.parametrize("sampler", ["pndm", "lms", "heun", "dpm_2_a", "unipc", "lcm"])
def test_every_sampler_is_guided(sd1, clip, sampler):
    """Beyond the original's DDIM / PNDM / LMS: each sampler's own x0 estimate and sigma."""
    job = Job("a red car", "", seed=1, width=64, height=64, steps=4, scale=5.0)
    assert _final_clip_loss(sd1, clip, sampler, 100.0, job) < _final_clip_loss(sd1, clip, sampler, 0.0, job) - 0.01


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_v_prediction_models_are_guided(tiny_models, sampler):
    model = load_model(str(tiny_models["sd2-v"]))
    clip = ClipGuide(load_clip_model(str(tiny_models["clip"]), CPU, torch.float32), model.tokenizer)
    job = _job(seed=1)
    losses = []
    for scale in (0.0, 100.0):
        pipeline = make_pipeline(model, sampler)
        if scale:
            pipeline.patches.add(GuidedGeneration(model.vae, Scales(clip_text=scale), clip, v_prediction=True))
        image = (pipeline.decode(pipeline.latents([job]), 1) / 2 + 0.5).clamp(0, 1)
        with torch.no_grad():
            losses.append(float(clip.loss(image, clip.text_features(job), 1.0)))
    assert losses[1] < losses[0] - 0.02, losses


def test_image_and_vgg_guidance_lower_their_losses(tiny_models, sd1, clip, guide):
    vgg = VggGuide(load_vgg16_features(str(tiny_models["vgg16"]), CPU, torch.float32), 20)
    job = _job(guide_image=str(guide))
    losses = {}
    for name, scales in (("off", Scales()), ("image", Scales(clip_image=100.0)), ("vgg", Scales(vgg16=100.0))):
        pipeline = make_pipeline(sd1, "ddim")
        pipeline.patches.add(GuidedGeneration(sd1.vae, scales, clip, vgg))
        image = (pipeline.decode(pipeline.latents([job]), 1) / 2 + 0.5).clamp(0, 1)
        with torch.no_grad():
            losses[name] = (float(clip.loss(image, clip.guide_features(str(guide)), 1.0)),
                            float(vgg.loss(image, vgg.guide_features(str(guide), 64, 64), 1.0)))
    assert losses["image"][0] < losses["off"][0] * 0.95, losses
    assert losses["vgg"][1] < losses["off"][1] * 0.9, losses


def test_c_changes_only_its_image_and_batches_do_not_change_images(tiny_models, tmp_path):
    clip = ("--clip_guidance_scale", "100", "--clip_model", str(tiny_models["clip"]), "--sequential_file_name")
    plain, with_c = tmp_path / "plain.txt", tmp_path / "c.txt"
    plain.write_text("a cat --d 5\na dog --d 6\na cow --d 7\n")
    with_c.write_text("a cat --d 5\na dog --d 6 --c a red car\na cow --d 7\n")
    results = {}
    for name, prompts, batch in (("plain", plain, "1"), ("c", with_c, "1"), ("c3", with_c, "3")):
        assert run(tiny_models, tmp_path / name, "--from_file", str(prompts), "--batch_size", batch, *clip) == 0
        results[name] = [pixels(p) for p in pngs(tmp_path / name)]
    assert np.array_equal(results["plain"][0], results["c"][0])
    assert np.array_equal(results["plain"][2], results["c"][2])
    assert np.abs(results["plain"][1] - results["c"][1]).max() > 5
    assert meta(pngs(tmp_path / "c")[1])["clip-prompt"] == "a red car"
    for alone, together in zip(results["c"], results["c3"]):
        assert np.abs(alone - together).max() <= 1


# --- the manual's command lines and the errors ---------------------------------------------------


def test_the_manuals_examples_run_with_local_models(tiny_models, tmp_path, guide, caplog):
    """The three examples of the manual (tiny model, 64x64, few steps; no --xformers/--fp16 on CPU)."""
    ckpt = str(tiny_models["sd1"])
    clip = ("--clip_model", str(tiny_models["clip"]))
    common = ("--n_iter", "1", "--W", "64", "--H", "64", "--batch_size", "1", "--images_per_prompt", "1",
              "--sampler", "ddim", "--opt_channels_last", "--steps", "4")
    with caplog.at_level(logging.INFO, logger="library.features.guidance"):
        assert gen_img.main(["--ckpt", ckpt, *common, "--scale", "2.5", "--outdir", str(tmp_path / "a"),
                             "--prompt", "a girl", "--clip_guidance_scale", "100", *clip]) == 0
    assert "guidance: CLIP text 100, CLIP image 0, VGG16 0 (layer 20)" in caplog.messages
    assert gen_img.main(["--ckpt", ckpt, *common, "--scale", "7.5", "--outdir", str(tmp_path / "b"),
                         "--prompt", "a girl", "--clip_image_guidance_scale", "100",
                         "--guide_image_path", str(guide), *clip]) == 0
    sources = guide.parent
    assert gen_img.main(["--ckpt", ckpt, *common, "--scale", "5.5", "--outdir", str(tmp_path / "c"),
                         "--prompt", "picturesque, 1girl, solo --n lowres, bad anatomy --d 1", "--strength", "0.8",
                         "--image_path", str(sources), "--vgg16_guidance_scale", "100",
                         "--guide_image_path", str(sources), "--vgg16_weights", str(tiny_models["vgg16"]),
                         "--vgg16_guidance_layerP", "15"]) == 0
    assert [len(pngs(tmp_path / d)) for d in "abc"] == [1, 1, 1]
    items = [meta(pngs(tmp_path / d)[0])["parameters"].splitlines()[-1].split(", ") for d in "abc"]
    assert [item for item in items[0] if "guidance" in item] == ["CLIP guidance scale: 100"]
    assert [item for item in items[1] if "guidance" in item] == ["CLIP image guidance scale: 100"]
    assert [item for item in items[2] if "guidance" in item] == ["VGG16 guidance scale: 100",
                                                                 "VGG16 guidance layer: 15"]


@pytest.mark.parametrize("extra,expected", [
    (("--clip_guidance_scale", "100", "--clip_model", "/nowhere/clip"),
     "gen_img.py: error: --clip_model /nowhere/clip: no such file or folder; download "
     "laion/CLIP-ViT-B-32-laion2B-s34B-b79K (huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K) "
     "and give its folder with --clip_model"),
    (("--clip_image_guidance_scale", "100", "--clip_model", "x"),
     "gen_img.py: error: --clip_image_guidance_scale needs --guide_image_path (the image or folder to guide "
     "towards) (see --help)"),
    (("--vgg16_guidance_scale", "100",),
     "gen_img.py: error: --vgg16_guidance_scale needs --guide_image_path (the image or folder to guide towards) "
     "(see --help)"),
    (("--vgg16_guidance_layer", "31",),
     "gen_img.py: error: --vgg16_guidance_layer 31: must be 0..30 (VGG16's features) (see --help)"),
])
def test_unknown_models_and_missing_guides_are_one_line_exit_2(tiny_models, tmp_path, capsys, extra, expected):
    try:
        code = run(tiny_models, tmp_path / "out", "--prompt", "a cat", *extra)
    except SystemExit as exc:
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and err == [expected]
    assert not (tmp_path / "out").exists() or not pngs(tmp_path / "out")


def test_missing_vgg16_weights_name_the_option_and_the_file(tiny_models, tmp_path, capsys, monkeypatch, guide):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = run(tiny_models, tmp_path / "out", "--prompt", "a cat", "--vgg16_guidance_scale", "100",
               "--guide_image_path", str(guide))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and err == [
        f"gen_img.py: error: --vgg16_guidance_scale needs VGG16 weights: no --vgg16_weights and no "
        f"{tmp_path / 'torch' / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'}; get torchvision's "
        "https://download.pytorch.org/models/vgg16-397923af.pth and give its path with --vgg16_weights"]


def test_progress_bar_names_the_guidance_of_the_batch(sd1, clip, guide):
    from library.sampling.patches import PatchOwner

    feature = GuidedGeneration(sd1.vae, Scales(clip_text=100.0, clip_image=50.0), clip)
    scheduler = make_scheduler("ddim", False)
    scheduler.set_timesteps(2)

    def label(job: Job) -> str:
        batch = Batch((job,), BatchLayout(1, 2, 8, 8), scheduler, scheduler.timesteps, CPU, torch.float32)
        with PatchOwner(sd1.unet, [feature]).installed(batch) as run:
            return run.description("steps")

    assert label(_job(guide_image=str(guide))) == "steps (CLIP + CLIP image guidance)"
    assert label(_job()) == "steps (CLIP guidance)"  # no guide (Highres fix 2nd stage without ControlNet)
    assert GuidedGeneration(sd1.vae, Scales(), clip).for_batch(None) is None


def test_a_file_that_is_not_a_clip_model_is_one_line_exit_2(tiny_models, tmp_path, capsys):
    vae = tiny_models["vae"]
    code = run(tiny_models, tmp_path / "out", "--prompt", "a cat", "--clip_guidance_scale", "100",
               "--clip_model", str(vae))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and err == [
        f"gen_img.py: error: --clip_model {vae}: not a CLIPModel ('text_model.embeddings.token_embedding.weight'); "
        "download laion/CLIP-ViT-B-32-laion2B-s34B-b79K (huggingface-cli download "
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K) and give its folder with --clip_model"]


def test_guidance_with_controlnet_and_highres_fix(tiny_models, tmp_path, guide, monkeypatch):
    """Both stages guided; ControlNet's hints follow the guidance's single-row U-Net calls; the
    2nd stage without ControlNet has no guide image, so only CLIP text guidance runs there."""
    from library.sampling.patches import BatchRun

    seen: list[str] = []
    real = BatchRun.description
    monkeypatch.setattr(BatchRun, "description", lambda self, base: seen.append(real(self, base)) or seen[-1])
    assert run(tiny_models, tmp_path / "out", "--prompt", "a cat", "--W", "128", "--H", "128",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "2", "--highres_fix_disable_control_net",
               "--images_per_prompt", "2", "--batch_size", "2", "--sampler", "euler_a",
               "--clip_guidance_scale", "100", "--vgg16_guidance_scale", "100",
               "--clip_model", str(tiny_models["clip"]), "--vgg16_weights", str(tiny_models["vgg16"]),
               "--control_net_models", str(tiny_models["controlnet-sd1"]), "--guide_image_path", str(guide)) == 0
    assert seen == ["steps (CLIP + VGG16 guidance)", "steps (CLIP guidance)"]
    assert len(pngs(tmp_path / "out")) == 2


@pytest.mark.parametrize("extra,expected", [
    (("--clip_guidance_scale", "100", "--clip_model", "/nowhere/clip"), "--clip_model /nowhere/clip: no such file"),
    (("--vgg16_guidance_scale", "100", "--vgg16_weights", "/nowhere/vgg.pth"),
     "--vgg16_weights /nowhere/vgg.pth: no such file; get torchvision's "),
])
def test_missing_guidance_models_are_found_before_the_checkpoint_opens(tiny_models, tmp_path, capsys, guide,
                                                                      extra, expected):
    """A damaged checkpoint would be the loader's error: the guidance model's comes first (preflight)."""
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a model")
    guided = ("--guide_image_path", str(guide)) if "--vgg16_guidance_scale" in extra else ()
    code = gen_img.main(["--ckpt", str(damaged), "--outdir", str(tmp_path / "out"), "--prompt", "a cat",
                         *guided, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"gen_img.py: error: {expected}"), err
