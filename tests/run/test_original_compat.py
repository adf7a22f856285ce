"""The original's scripts run unchanged and give the original's images: the img2img
start rule, the options of the original's command line, prompt options, seeds and metadata."""

from __future__ import annotations

import pytest
import torch

from library.models import load_model
from library.records.jobs import Job
from library.sampling import pipeline as pipeline_module
from library.sampling.img2img import Img2ImgInput, StartIndices, start_indices
from library.sampling.pipeline import Pipeline
from tests.helpers import make_pipeline, make_source, meta, pngs, run, run_img2img


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["sd1"]))


@pytest.fixture
def schedule_log(monkeypatch):
    """Each loop of a run as {"noised": [timesteps add_noise got, in order], "ran": [timesteps run]}."""
    log: list[dict] = []
    real_make = pipeline_module.make_scheduler

    def make(*args, **kwargs):
        scheduler = real_make(*args, **kwargs)
        real_add = scheduler.add_noise
        entry = {"noised": [], "ran": [], "scheduler": scheduler}
        log.append(entry)

        def add_noise(x, noise, t):
            out = real_add(x, noise, t)
            entry["noised"].append((int(t.reshape(-1)[0]), x, noise, out))
            return out

        scheduler.add_noise = add_noise
        return scheduler

    real_denoise = Pipeline._denoise

    def denoise(self, batch, guidance, latents, step_kwargs):
        log[-1]["ran"] = [int(t) for t in batch.timesteps]
        return real_denoise(self, batch, guidance, latents, step_kwargs)

    monkeypatch.setattr(pipeline_module, "make_scheduler", make)
    monkeypatch.setattr(Pipeline, "_denoise", denoise)
    return log


# --- img2img start ----------------------------------------------------------------------------------

DDIM_10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_start_rule_indices():
    # init = min(int(steps * strength) + offset, steps); noised at [-init]; runs [steps - init + offset:]
    assert start_indices(10, 0.6, 1) == StartIndices(noise=3, begin=4)
    assert start_indices(10, 0.6, 0) == StartIndices(noise=4, begin=4)
    assert start_indices(10, 0.0, 1) == StartIndices(noise=9, begin=10)  # noised at the last timestep, no step
    assert start_indices(10, 0.0, 0) == StartIndices(noise=None, begin=10)  # the source as it is
    assert start_indices(10, 0.95, 1) == StartIndices(noise=0, begin=1)  # init capped at steps
    assert start_indices(10, 1.0, 1) == StartIndices(noise=None, begin=0)  # strength 1: pure noise, all steps
    # heun / dpm_2 (order 2): counted in whole sampler steps, both indices times the order
    assert start_indices(10, 0.6, 1, order=2) == StartIndices(noise=6, begin=8)


@pytest.mark.parametrize("zero_offset,noised,ran", [(False, 601, DDIM_10[4:]), (True, 501, DDIM_10[4:])])
def test_img2img_noises_at_the_7th_from_last_and_runs_the_last_6(tiny_models, tmp_path, schedule_log,
                                                                 zero_offset, noised, ran):
    src = make_source(tmp_path / "s.png")
    extra = ["--force_scheduler_zero_steps_offset"] if zero_offset else []
    assert run_img2img(tiny_models, tmp_path / "o", "--image_path", str(src), "--steps", "10", "--strength", "0.6",
                       "--prompt", "x --d 3", *extra) == 0
    (entry,) = schedule_log
    assert [t for t, *_ in entry["noised"]] == [noised]
    assert entry["ran"] == ran == [501, 401, 301, 201, 101, 1]
    assert DDIM_10[-7] == 601


@pytest.mark.parametrize("zero_offset,index", [(False, 3), (True, 4)])
def test_sigma_schedulers_noise_with_that_steps_sigma(model, schedule_log, zero_offset, index):
    pipeline = make_pipeline(model, "euler")
    pipeline.zero_steps_offset = zero_offset
    job = Job("x", "", seed=1, width=32, height=32, steps=10, scale=4.0, strength=0.6)
    pipeline.latents([job], Img2ImgInput(0.6, images=torch.zeros(1, 3, 32, 32)))
    (entry,) = schedule_log
    (t, x, noise, out), sigmas = entry["noised"][0], entry["scheduler"].sigmas
    assert t == int(entry["scheduler"].timesteps[index])
    assert torch.allclose(out, x + noise * sigmas[index])
    assert entry["ran"] == [int(v) for v in entry["scheduler"].timesteps[4:]]


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_second_order_samplers_run_whole_steps(model, schedule_log, sampler):
    pipeline = make_pipeline(model, sampler)
    job = Job("x", "", seed=1, width=32, height=32, steps=10, scale=4.0, strength=0.6)
    pipeline.latents([job], Img2ImgInput(0.6, images=torch.zeros(1, 3, 32, 32)))
    (entry,) = schedule_log
    timesteps = [int(v) for v in entry["scheduler"].timesteps]
    assert len(timesteps) == 19
    assert entry["noised"][0][0] == timesteps[6]  # step 3 (of 0..9) = index 6 of the doubled list
    assert entry["ran"] == timesteps[8:]  # steps 4..9: 6 steps, 11 U-Net calls
    assert len(entry["ran"]) == 11


@pytest.mark.parametrize("zero_offset,noised", [(False, 601), (True, 501)])
def test_highres_fix_2nd_stage_uses_the_same_rule(tiny_models, tmp_path, schedule_log, zero_offset, noised):
    extra = ["--force_scheduler_zero_steps_offset"] if zero_offset else []
    assert run(tiny_models, tmp_path / "o", "--W", "128", "--H", "128", "--steps", "10", "--strength", "0.6",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "4", "--prompt", "x --d 3", *extra) == 0
    first, second = schedule_log
    assert first["noised"] == [] and len(first["ran"]) == 4
    assert [t for t, *_ in second["noised"]] == [noised]
    assert second["ran"] == DDIM_10[4:]


# --- prompt options ---------------------------------------------------------------------------------


def test_unknown_and_sdxl_prompt_options_keep_the_line(tiny_models, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first --zz 3 --d 1\nsecond --ow 1024 --ct 8 --d 2\nthird --nl none --d 3\n")
    with caplog.at_level("WARNING"):
        assert run(tiny_models, tmp_path / "o", "--from_file", str(prompts), "--negative_scale", "2",
                   "--sequential_file_name") == 0
    files = pngs(tmp_path / "o")
    assert [meta(p)["prompt"] for p in files] == ["first", "second", "third"]
    assert [meta(p).get("negative-scale") for p in files] == ["2.0", "2.0", None]
    assert f'{prompts}:1: unknown prompt option --zz (in "--zz 3") ignored, the line runs without it' in caplog.text
    assert (f"{prompts}:2: --ow --ct ignored: SDXL only (this model is SD 1.x/2.x, without size conditioning); "
            "the line runs without it") in caplog.text


# --- the original's command line ----------------------------------------------------------------------

#: Every option of the original's argparse (gen_img.py at HEAD) that applies to SD 1.x/2.x, except
#: Deep Shrink (--ds_*), Gradual Latent (--gradual_latent_*) and regional masks
#: (--network_regional_mask_max_color_codes), which issues 12-14 own.
ORIGINAL_OPTIONS = (
    "v1 v2 v_parameterization zero_terminal_snr pyramid_noise_prob pyramid_noise_discount_range noise_offset_prob "
    "noise_offset_range prompt from_file from_module prompter_module_args interactive no_preview image_path "
    "mask_path strength images_per_prompt outdir sequential_file_name use_original_file_name n_iter H W batch_size "
    "vae_batch_size vae_slices no_half_vae steps sampler scale ckpt vae tokenizer_cache_dir seed iter_same_seed "
    "shuffle_prompts fp16 bf16 xformers sdpa diffusers_xformers opt_channels_last network_module network_weights "
    "network_mul network_args network_show_meta network_merge_n_models network_merge network_pre_calc "
    "textual_inversion_embeddings clip_skip max_embeddings_multiples emb_normalize_mode "
    "force_scheduler_zero_steps_offset guide_image_path highres_fix_scale highres_fix_steps highres_fix_strength "
    "highres_fix_save_1st highres_fix_latents_upscaling highres_fix_upscaler highres_fix_upscaler_args "
    "highres_fix_disable_control_net negative_scale control_net_models control_net_preps control_net_multipliers "
    "control_net_ratios console_log_level console_log_file console_log_simple"
).split()
SDXL_ONLY = ["--clip_vision_strength 0.5", "--control_net_lllite_models a.safetensors"]
SDXL_SIZES = [f"--{n} 8" for n in ("original_height", "original_width", "original_height_negative",
                                   "original_width_negative", "crop_top", "crop_left")]


def test_every_option_of_the_original_is_known():
    from library.cli.parser import build_parser

    known = build_parser()._option_string_actions
    assert [name for name in ORIGINAL_OPTIONS if f"--{name}" not in known] == []


@pytest.mark.parametrize("option", SDXL_ONLY)
def test_sdxl_only_options_are_one_clear_line(tiny_models, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        run(tiny_models, tmp_path / "o", "--prompt", "x", *option.split())
    assert exit_.value.code == 2
    name = option.split()[0]
    assert capsys.readouterr().err.strip() == (
        f"gen_img.py: error: {name}: not supported yet (SDXL's CLIP Vision and ControlNet-LLLite); leave it out "
        "(see --help)")


@pytest.mark.parametrize("option", SDXL_SIZES)
def test_sdxl_size_options_on_an_sd1_model_are_one_clear_line(tiny_models, tmp_path, capsys, monkeypatch, option):
    import library.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run(tiny_models, tmp_path / "o", "--prompt", "x", *option.split()) == 2
    name = option.split()[0]
    assert capsys.readouterr().err.strip() == (
        f"gen_img.py: error: {name}: SDXL only; this model is SD 1.x/2.x, which has no size conditioning")
    assert not pngs(tmp_path / "o")


@pytest.mark.parametrize("option, message", [
    ("--original_height 0", "--original_height 0: must be at least 1"),
    ("--crop_top -5", "--crop_top -5: must be at least 0"),
    ("--original_width_negative 70000", "--original_width_negative 70000: must be at most 65536"),
    ("--sdxl --v2", "--v2 and --sdxl exclude each other"),
])
def test_bad_sdxl_options_stop_before_any_model_loads(tmp_path, capsys, option, message):
    import gen_img

    with pytest.raises(SystemExit) as exit_:
        gen_img.main(["--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "x", *option.split()])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"gen_img.py: error: {message} (see --help)"


def test_xformers_without_xformers_warns_and_uses_sdpa(tiny_models, tmp_path, caplog):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with caplog.at_level("WARNING"):
        assert run(tiny_models, tmp_path / "x", "--prompt", "x --d 1", "--xformers") == 0
        assert run(tiny_models, tmp_path / "d", "--prompt", "x --d 1", "--diffusers_xformers") == 0
    assert run(tiny_models, tmp_path / "s", "--prompt", "x --d 1") == 0
    warnings = [r.getMessage() for r in caplog.records if "xformers is not installed" in r.getMessage()]
    assert warnings == [f"{option}: xformers is not installed; using PyTorch SDPA attention instead (the same "
                        "speed on CPU; pip install xformers to use it on a GPU)"
                        for option in ("--xformers", "--diffusers_xformers")]
    import numpy as np

    from tests.helpers import pixels
    assert np.array_equal(pixels(pngs(tmp_path / "x")[0]), pixels(pngs(tmp_path / "s")[0]))


def test_console_log_options(tiny_models, tmp_path):
    log = tmp_path / "run.log"
    assert run(tiny_models, tmp_path / "o", "--prompt", "x --zz 1 --d 1", "--console_log_file", str(log),
               "--console_log_simple", "--console_log_level", "warning") == 0
    from library.prompts.line_options import PROMPT_OPTIONS

    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines == ['--prompt: unknown prompt option --zz (in "--zz 1") ignored, the line runs without it; known: '
                     + ", ".join("--" + o.name for o in PROMPT_OPTIONS)]


def test_prompter_module_args_reach_the_prompter(tiny_models, tmp_path):
    module = tmp_path / "p.py"
    module.write_text("def get_prompter(args, pipe, networks):\n"
                      "    return iter([args.prompter_module_args + ' --d 1'])\n")
    assert run(tiny_models, tmp_path / "o", "--from_module", str(module), "--prompter_module_args", "a lighthouse") == 0
    assert [meta(p)["prompt"] for p in pngs(tmp_path / "o")] == ["a lighthouse"]


def test_zero_terminal_snr(tiny_models, tmp_path, capsys):
    from library.sampling.schedulers import make_scheduler

    rescaled = make_scheduler("ddim", False, zero_terminal_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) < 1e-6 < float(make_scheduler("ddim", False).alphas_cumprod[-1])
    assert run(tiny_models, tmp_path / "z", "--prompt", "x --d 1", "--zero_terminal_snr") == 0
    assert run(tiny_models, tmp_path / "n", "--prompt", "x --d 1") == 0
    import numpy as np

    from tests.helpers import pixels
    assert not np.array_equal(pixels(pngs(tmp_path / "z")[0]), pixels(pngs(tmp_path / "n")[0]))
    with pytest.raises(SystemExit):
        run(tiny_models, tmp_path / "e", "--prompt", "x", "--zero_terminal_snr", "--sampler", "pndm")
    assert "--zero_terminal_snr: --sampler pndm does not support it; use one of ddim, euler, euler_a" in (
        capsys.readouterr().err)


def test_noise_offset_and_pyramid_noise_come_from_the_seed():
    from library.sampling.noise import draw_image_noise
    from library.sampling.start_noise import StartNoise

    def initial(change):
        return draw_image_noise([5], (4, 16, 16), steps=2, noises_per_step=1, img2img=False,
                                device=torch.device("cpu"), dtype=torch.float32, modify=change).initial[0]

    plain = initial(None)
    offset = StartNoise(offset_prob=1.0, offset_range=(0.5, 0.5))
    assert torch.allclose(initial(offset), plain + 0.5)  # max - min = 0: the offset is exactly MIN
    assert torch.equal(initial(StartNoise(offset_prob=0.0, offset_range=(1.0, 2.0))), plain)
    pyramid = StartNoise(pyramid_prob=1.0, pyramid_range=(0.8, 0.8))
    once, again = initial(pyramid), initial(pyramid)
    assert torch.equal(once, again) and not torch.allclose(once, plain)
    assert abs(float(once.std()) - 1.0) < 1e-5


def test_noise_options_on_the_command_line(tiny_models, tmp_path, capsys):
    import numpy as np

    from tests.helpers import pixels

    common = ["--prompt", "x --d 1", "--noise_offset_prob", "1", "--noise_offset_range", "0.3", "0.3"]
    assert run(tiny_models, tmp_path / "a", *common) == 0
    assert run(tiny_models, tmp_path / "b", *common) == 0
    assert run(tiny_models, tmp_path / "c", "--prompt", "x --d 1") == 0
    a, b, c = (pixels(pngs(tmp_path / n)[0]) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(SystemExit):
        run(tiny_models, tmp_path / "e", "--prompt", "x", "--pyramid_noise_prob", "0.5")
    assert "--pyramid_noise_prob needs --pyramid_noise_discount_range MIN MAX" in capsys.readouterr().err


def test_control_net_multipliers_and_several_guide_images(tmp_path):
    from PIL import Image

    from library.cli.parser import parse_options
    from library.images.input_images import GuideImages

    for name in ("a.png", "folder/b.png", "folder/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    options = parse_options(["--prompt", "x", "--control_net_models", "m", "--control_net_multipliers", "0.5",
                             "--guide_image_path", str(tmp_path / "a.png"), str(tmp_path / "folder")])
    assert options.controlnet.weights == (0.5,)
    guides = GuideImages(options.controlnet.guide_image_path)
    assert [guides.next_path() for _ in range(4)] == [str(tmp_path / n) for n in
                                                      ("a.png", "folder/b.png", "folder/c.png", "a.png")]


# --- sizes, masks, seeds ------------------------------------------------------------------------------


def test_mask_of_another_size_is_resized_with_w_and_h(tiny_models, tmp_path):
    from PIL import Image

    src = make_source(tmp_path / "s.png", (64, 64))
    Image.new("L", (32, 16), 255).save(tmp_path / "m.png")
    assert run_img2img(tiny_models, tmp_path / "o", "--image_path", str(src), "--mask_path", str(tmp_path / "m.png"),
                       "--W", "96", "--H", "64", "--prompt", "x --d 1") == 0
    assert Image.open(pngs(tmp_path / "o")[0]).size == (96, 64)


def test_n_iter_draws_new_seeds_in_every_round(tiny_models, tmp_path):
    import random

    assert run(tiny_models, tmp_path / "o", "--prompt", "x", "--seed", "42", "--n_iter", "3") == 0
    draws = random.Random(42)
    assert sorted(int(meta(p)["seed"]) for p in pngs(tmp_path / "o")) == sorted(
        draws.randint(0, 2**32 - 1) for _ in range(3))
    assert run(tiny_models, tmp_path / "one", "--prompt", "x", "--seed", "42") == 0
    assert [meta(p)["seed"] for p in pngs(tmp_path / "one")] == ["42"]  # one image, one round: S itself


# --- Highres fix ----------------------------------------------------------------------------------------


def test_highres_fix_with_img2img(tiny_models, tmp_path, call_log):
    from PIL import Image

    src = make_source(tmp_path / "s.png", (128, 96))
    assert run_img2img(tiny_models, tmp_path / "o", "--image_path", str(src), "--highres_fix_scale", "0.5",
                       "--highres_fix_steps", "10", "--highres_fix_strength", "0.3", "--strength", "0.6",
                       "--steps", "10", "--prompt", "x --d 5", "--highres_fix_save_1st") == 0
    # 1st stage: img2img of the source at the 1st-stage size with --highres_fix_strength;
    # 2nd stage: img2img of the upscaled 1st image with --strength, seed + 1
    assert [(e["size"], e["steps"], e["strength"], e["ran"], e["seeds"]) for e in call_log] == [
        ((64, 32), 10, 0.3, 3, [5]), ((128, 96), 10, 0.6, 6, [6])]
    sizes = sorted(Image.open(p).size for p in pngs(tmp_path / "o"))
    assert sizes == [(64, 32), (128, 96)]


def test_highres_fix_img2img_1st_stage_strength_defaults_to_strength(tiny_models, tmp_path, call_log):
    src = make_source(tmp_path / "s.png", (128, 96))
    assert run_img2img(tiny_models, tmp_path / "o", "--image_path", str(src), "--highres_fix_scale", "0.5",
                       "--highres_fix_steps", "10", "--strength", "0.5", "--steps", "10", "--prompt", "x --t 0.4") == 0
    assert [(e["strength"], e["ran"]) for e in call_log] == [(0.4, 4), (0.4, 4)]


def test_latents_upscaling_flag_alone_is_bicubic(tiny_models, tmp_path):
    import numpy as np

    from tests.helpers import pixels

    common = ["--W", "128", "--H", "96", "--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--prompt", "x --d 1"]
    assert run(tiny_models, tmp_path / "flag", *common, "--highres_fix_latents_upscaling") == 0
    assert run(tiny_models, tmp_path / "cubic", *common, "--highres_fix_latents_upscaling", "bicubic") == 0
    assert run(tiny_models, tmp_path / "linear", *common, "--highres_fix_latents_upscaling", "bilinear") == 0
    flag, cubic, linear = (pixels(pngs(tmp_path / n)[0]) for n in ("flag", "cubic", "linear"))
    assert np.array_equal(flag, cubic) and not np.array_equal(flag, linear)


# --- --from_module ------------------------------------------------------------------------------------


def test_from_module_prompter_gets_seed_random_and_is_asked_every_round(tiny_models, tmp_path):
    import random

    module = tmp_path / "p.py"
    module.write_text(
        "calls = []\n"
        "def get_prompter(args, pipe, networks):\n"
        "    def prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step):\n"
        "        if prompt_index >= 2:\n"
        "            return None\n"
        "        calls.append((prompt_index, global_step))\n"
        "        return f'p{prompt_index} r{seed_random.randint(0, 9)} --d {len(calls)}'\n"
        "    return prompter\n")
    assert run(tiny_models, tmp_path / "o", "--from_module", str(module), "--n_iter", "2", "--seed", "3",
               "--sequential_file_name") == 0
    draws = random.Random(3)
    expected = [f"p{i % 2} r{draws.randint(0, 9)}" for i in range(4)]
    assert [meta(p)["prompt"] for p in pngs(tmp_path / "o")] == expected
    assert [meta(p)["seed"] for p in pngs(tmp_path / "o")] == ["1", "2", "3", "4"]


# --- files and metadata -------------------------------------------------------------------------------


def test_file_index_counts_from_000(tiny_models, tmp_path):
    import re

    assert run(tiny_models, tmp_path / "o", "--prompt", "x --d 7,8", "--images_per_prompt", "2") == 0
    assert [re.sub(r"im_\d{14}_", "im_<ts>_", p.name) for p in pngs(tmp_path / "o")] == [
        "im_<ts>_000_7.png", "im_<ts>_001_8.png"]
    assert run(tiny_models, tmp_path / "h", "--prompt", "x --d 7", "--W", "64", "--H", "64",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "2") == 0
    assert [re.sub(r"im_\d{14}_", "im_<ts>_", p.name) for p in pngs(tmp_path / "h")] == ["im_<ts>_1000_7.png"]


def test_raw_prompt_is_always_written(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "o", "--prompt", "a cat --n dog --d 1") == 0
    (png,) = pngs(tmp_path / "o")
    assert (meta(png)["prompt"], meta(png)["raw-prompt"]) == ("a cat", "a cat --n dog")  # less --d, as the original


def test_a1111_parameters_name_loras_embeddings_vae_and_eta(tiny_models, tmp_path):
    import hashlib

    from safetensors.torch import save_file

    from library.images.metadata import parse_a1111_parameters
    from networks.lora_files import write_kohya_lora

    model = load_model(str(tiny_models["sd1"]))
    lora = tmp_path / "my,style.safetensors"
    write_kohya_lora(lora, model.text_encoder, model.unet, rank=4, seed=1)
    emb = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(emb))
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"x")  # only hashed and named here: --vae is not passed
    prompts = tmp_path / "p.txt"
    prompts.write_text("a shiny cat --d 1\na cat --am 0.25 --d 2\n")
    assert run(tiny_models, tmp_path / "o", "--from_file", str(prompts), "--network_module", "networks.lora",
               "--network_weights", str(lora), "--network_mul", "0.8", "--textual_inversion_embeddings", str(emb),
               "--ddim_eta", "0.5", "--sequential_file_name") == 0
    raw = lora.read_bytes()
    header = int.from_bytes(raw[:8], "little") + 8
    lora_hash = hashlib.sha256(raw[header:]).hexdigest()[:12]
    emb_hash = hashlib.sha256(emb.read_bytes()).hexdigest()[:12]
    first, second = (meta(p) for p in pngs(tmp_path / "o"))
    assert first["parameters"].startswith("a shiny cat <lora:mystyle:0.8>\n")
    assert second["parameters"].startswith("a cat <lora:mystyle:0.25>\n")
    assert first["prompt"] == "a shiny cat"
    params = parse_a1111_parameters(first["parameters"])
    assert (params["Eta DDIM"], params["Lora hashes"], params["TI hashes"]) == (
        "0.5", f"mystyle: {lora_hash}", f"shiny: {emb_hash}")

    from library.images.run_metadata import run_parameters
    assert run_parameters(vae=str(vae), sampler="euler", ddim_eta=0.5, lora_files=[], embedding_files=[]) == (
        ("VAE hash", hashlib.sha256(b"x").hexdigest()[:10]), ("VAE", "vae.safetensors"))


# --- silent no-ops become warnings ---------------------------------------------------------------------


def test_silent_no_ops_are_warned(tiny_models, tmp_path, caplog):
    from networks.lora_files import write_kohya_lora

    model = load_model(str(tiny_models["sd1"]))
    lora = tmp_path / "l.safetensors"
    write_kohya_lora(lora, model.text_encoder, model.unet, rank=4, seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --am 0.5 --d 1\n")
    with caplog.at_level("WARNING"):
        assert run(tiny_models, tmp_path / "a", "--from_file", str(prompts), "--sampler", "euler",
                   "--ddim_eta", "0.3") == 0
        assert run(tiny_models, tmp_path / "b", "--from_file", str(prompts), "--network_module", "networks.lora",
                   "--network_weights", str(lora), "--network_merge", "--network_args", "foo=1,bar=2") == 0
    text = caplog.text
    assert f"{prompts}:1: --am ignored: no networks are loaded" in text
    assert "--ddim_eta 0.3 ignored: --sampler euler has no eta (ddim has)" in text
    assert f"{prompts}:1: --am does not change the first 1 network(s): they are merged into the model" in text
    assert "--network_args bar, foo ignored: this LoRA module takes no network arguments" in text


def test_the_originals_upscaler_file_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from library.errors import UserError
    from library.sampling.highres_fix import load_upscaler

    weights = tmp_path / "upscaler-v1-e100-220.safetensors"
    save_file({"upsample.0.weight": torch.zeros(4, 4, 3, 3)}, str(weights))  # some other layout
    with pytest.raises(UserError) as caught:
        load_upscaler("tools.latent_upscaler", f"weights={weights}")
    assert str(caught.value) == (
        f"--highres_fix_upscaler_args weights={weights}: not a tools.latent_upscaler network (no conv_in.weight); "
        "the original's upscaler-v1-e100-220.safetensors layout is not loaded (its network definition is not "
        "available to this project), so make one with python -m library.sampling.latent_upscaler or use "
        "--highres_fix_latents_upscaling")
