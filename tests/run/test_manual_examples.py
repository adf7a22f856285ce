"""The manual's example command lines and a prompt file with every prompt option of the original
run unchanged: every line generates, nothing is skipped, exit status 0, with
`--xformers` on a machine without xformers (a warning, then PyTorch SDPA).

Each command is the manual's, with the model, image and network files replaced by tiny test
files and the sizes, steps and image counts scaled down (`scaled`) so that the test runs on a
CPU in seconds; every option and prompt option stays as the manual writes it. The examples of
guidance, Deep Shrink / Gradual Latent and regional masks have their own tests
(tests/features/test_guidance.py, test_deep_shrink.py, test_gradual_latent.py, test_regional_cli.py);
their prompt options are in the prompt file here too.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

import gen_img
from library.prompts import sources as prompts
from tests.helpers import make_source, meta, pngs

#: Option values scaled down for a CPU: sizes / 8 (at least 64), steps and counts small.
_SCALE = {"--W": lambda v: max(64, int(v) // 8 // 8 * 8), "--H": lambda v: max(64, int(v) // 8 // 8 * 8),
          "--steps": lambda v: 2, "--highres_fix_steps": lambda v: 2, "--images_per_prompt": lambda v: min(int(v), 2),
          "--batch_size": lambda v: min(int(v), 2)}


def scaled(command: str, files: dict[str, str]) -> list[str]:
    """The manual's command line as argv, without `python gen_img.py`, its file names replaced by
    `files`, the values of `_SCALE`'s options scaled down, and 2 steps at 64 x 64 where the
    command leaves steps and size at their defaults."""
    argv = shlex.split(command.replace("\\\n", " "))[2:]
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in _SCALE:
            arg = str(_SCALE[argv[i - 1]](arg))
        out.append(files.get(arg, arg))
    if "--steps" not in out:  # the default 50 steps
        out += ["--steps", "2"]
    if "--W" not in out and "--image_path" not in out:  # the default 512 x 512
        out += ["--W", "64", "--H", "64"]
    return out


MANUAL_COMMANDS = {
    "interactive": "python gen_img.py --ckpt <model_name> --outdir <image_output_destination> --xformers --fp16 "
                   "--interactive",
    "one prompt": """python gen_img.py --ckpt <model_name> --outdir <image_output_destination> \\
    --xformers --fp16 --images_per_prompt 2 --prompt "a lighthouse, (masterpiece:1.2) --n blurry" """,
    "prompt file": """python gen_img.py --ckpt <model_name> --outdir <image_output_destination> \\
    --xformers --fp16 --from_file prompts.txt""",
    "64 images": """python gen_img.py --ckpt model.ckpt --outdir outputs \\
    --xformers --fp16 --W 512 --H 704 --scale 12.5 --sampler k_euler_a \\
    --steps 32 --batch_size 4 --images_per_prompt 64 \\
    --prompt "beautiful flowers --n monochrome" """,
    "10 per line": """python gen_img.py --ckpt model.ckpt --outdir outputs \\
    --xformers --fp16 --W 512 --H 704 --scale 12.5 --sampler k_euler_a \\
    --steps 32 --batch_size 4 --images_per_prompt 10 \\
    --from_file prompts.txt""",
    "TI and LoRA": """python gen_img.py --ckpt model.safetensors \\
    --scale 8 --steps 48 --outdir txt2img --xformers \\
    --W 512 --H 768 --fp16 --sampler k_euler_a \\
    --textual_inversion_embeddings goodembed.safetensors negprompt.pt \\
    --network_module networks.lora networks.lora \\
    --network_weights model1.safetensors model2.safetensors \\
    --network_mul 0.4 0.8 \\
    --clip_skip 2 --max_embeddings_multiples 1 \\
    --batch_size 8 --images_per_prompt 1 --interactive""",
    "img2img": """python gen_img.py --ckpt trinart_characters_it4_v1_vae_merged.ckpt \\
    --outdir outputs --xformers --fp16 --scale 12.5 --sampler k_euler --steps 32 \\
    --image_path template.png --strength 0.8 \\
    --prompt "1girl, cowboy shot, brown hair, pony tail, brown eyes, \\
          sailor school uniform, outdoors \\
          --n lowres, bad anatomy, bad hands, error, missing fingers, cropped, \\
          worst quality, low quality, normal quality, jpeg artifacts, (blurry), \\
          hair ornament, glasses" \\
    --batch_size 8 --images_per_prompt 32""",
    "Highres fix": """python gen_img.py  --ckpt trinart_characters_it4_v1_vae_merged.ckpt\\
    --n_iter 1 --scale 7.5 --W 1024 --H 1024 --batch_size 1 --outdir ../txt2img \\
    --steps 48 --sampler ddim --fp16 \\
    --xformers \\
    --images_per_prompt 1  --interactive \\
    --highres_fix_scale 0.5 --highres_fix_steps 28 --strength 0.5""",
    "ControlNet": """python gen_img.py --ckpt model_ckpt --scale 8 --steps 48 --outdir txt2img --xformers \\
    --W 512 --H 768 --bf16 --sampler k_euler_a \\
    --control_net_models diff_control_sd15_canny.safetensors --control_net_weights 1.0 \\
    --guide_image_path guide.png --control_net_ratios 1.0 --interactive""",
}

#: Every prompt option of the original that applies to SD 1.x/2.x (and its SDXL size options,
#: warned and ignored), one line each or combined; `--nl` both as a number and as `none`.
PROMPT_FILE = """\
# a comment line and a blank line are skipped, as in the original

a castle --n blurry, lowres --w 64 --h 64 --s 3 --l 6.5 --d 1
a cat --nl 2 --n a dog --d 2
a dog --nl none --t 0.5 --d 4
a bird --am 0.5,0.25 --c a small bird --d 5
a tree --f tree_file.png --d 6
a car --ow 1024 --oh 1024 --nw 512 --nh 512 --ct 0 --cl 0 --d 7
a hill --dsd1 1 --dst1 600 --dsd2 0 --dst2 300 --dsr 0.5 --d 8
a lake --glt 800 --glr 0.5 --gls 0.25 --gle 1 --glsn 1.0 --glus 3,0.5,0.5,1 --d 9
"""


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The manual's file names -> tiny test files."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from library.models import load_model
    from networks.lora_files import write_kohya_lora

    folder = tmp_path_factory.mktemp("manual")
    model = load_model(str(tiny_models["sd1"]))
    ckpt = str(tiny_models["sd1"])
    names = {n: ckpt for n in ("<model_name>", "model.ckpt", "model.safetensors", "model_ckpt",
                               "trinart_characters_it4_v1_vae_merged.ckpt")}
    for i, name in enumerate(("model1.safetensors", "model2.safetensors")):
        write_kohya_lora(folder / name, model.text_encoder, model.unet, rank=4, seed=i)
        names[name] = str(folder / name)
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "goodembed.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, folder / "negprompt.pt")
    names.update({n: str(folder / n) for n in ("goodembed.safetensors", "negprompt.pt")})
    names["template.png"] = str(make_source(folder / "template.png", (64, 96)))
    Image.new("RGB", (64, 64), "white").save(folder / "guide.png")
    names["guide.png"] = str(folder / "guide.png")
    ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(
        folder / "controlnet")
    names["diff_control_sd15_canny.safetensors"] = str(folder / "controlnet")
    names["prompts.txt"] = str(folder / "prompts.txt")
    (folder / "prompts.txt").write_text("a red house --d 1\nnight sky --n clouds --d 2\n", encoding="utf-8")
    return names


def _run(argv: list[str], outdir: Path, monkeypatch, typed: list[str]) -> int:
    """gen_img.main with `--outdir` redirected and `typed` as the interactive prompts."""
    argv = list(argv)
    if "--outdir" in argv:
        argv[argv.index("--outdir") + 1] = str(outdir)
    else:
        argv += ["--outdir", str(outdir)]
    lines = iter(typed)

    def answer(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    real = prompts.interactive_lines
    monkeypatch.setattr(prompts, "interactive_lines", lambda read=None: real(answer))
    return gen_img.main(argv + ["--no_preview"] if "--interactive" in argv else argv)


@pytest.mark.parametrize("name", MANUAL_COMMANDS)
def test_the_manuals_command_lines_run_unchanged(files, tmp_path, monkeypatch, caplog, name):
    argv = scaled(MANUAL_COMMANDS[name], files)
    with caplog.at_level(logging.WARNING):
        assert _run(argv, tmp_path / "out", monkeypatch, ["a small boat --d 3", "goodembed, a cat --d 4"]) == 0
    assert "skipped" not in caplog.text and "ERROR" not in caplog.text
    assert "--xformers: xformers is not installed; using PyTorch SDPA attention instead" in caplog.text
    expected = {"interactive": 2, "one prompt": 2, "prompt file": 2, "64 images": 2, "10 per line": 4,
                "TI and LoRA": 2, "img2img": 2, "Highres fix": 2, "ControlNet": 2}[name]
    assert len(pngs(tmp_path / "out")) == expected


def test_a_prompt_file_with_every_prompt_option(files, tmp_path, monkeypatch, caplog):
    prompts = tmp_path / "every_option.txt"
    prompts.write_text(PROMPT_FILE, encoding="utf-8")
    argv = ["--ckpt", files["<model_name>"], "--xformers", "--from_file", str(prompts), "--steps", "4",
            "--sampler", "k_euler_a",
            "--W", "64", "--H", "64", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
            "--network_module", "networks.lora", "networks.lora",
            "--network_weights", files["model1.safetensors"], files["model2.safetensors"]]
    with caplog.at_level(logging.WARNING):
        assert _run(argv, tmp_path / "out", monkeypatch, []) == 0
    assert "skipped" not in caplog.text
    written = pngs(tmp_path / "out")
    assert len(written) == 8  # one image per line
    assert sorted(meta(p)["seed"] for p in written) == ["1", "2", "4", "5", "6", "7", "8", "9"]
    assert (tmp_path / "out" / "tree_file.png").exists()
    by_seed = {meta(p)["seed"]: meta(p) for p in written}
    assert (by_seed["1"]["steps"], by_seed["1"]["scale"], by_seed["1"]["negative-prompt"]) == ("3", "6.5",
                                                                                               "blurry, lowres")
    assert by_seed["2"]["negative-scale"] == "2.0" and "negative-scale" not in by_seed["4"]
    assert "Denoising strength: 0.5" in by_seed["4"]["parameters"]
    assert "<lora:model1:0.5> <lora:model2:0.25>" in by_seed["5"]["parameters"]
    assert by_seed["5"]["clip-prompt"] == "a small bird"
    assert "--oh --ow --nh --nw --ct --cl ignored: SDXL only" in caplog.text
