"""txt2img through the real command: seeds, batching, prompt sources, output files, errors."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.images.metadata import parse_a1111_parameters
from library.models import load_model
from library.records.jobs import Job
from tests.helpers import ROOT, make_pipeline, meta, pixels, pngs, run
from tests.helpers import TXT2IMG_FAST as FAST

# --- batch invariance and seeds ---------------------------------------------------------------


@pytest.mark.parametrize("sampler,tolerance", [("ddim", 1e-5), ("euler_a", 2e-5), ("dpm_2_a", 3e-5)])
def test_batches_do_not_change_images(tiny_models, sampler, tolerance):
    """Noise and text embeddings are bitwise equal; oneDNN picks batch-size-dependent conv
    kernels, whose last-ulp differences are all that remains (about 1e-5 in the image, which
    is in [-1, 1]: 1.1e-5 for euler_a on an AMD EPYC, a thousandth of one 8-bit level)."""
    model = load_model(str(tiny_models["sd1"]))
    pipeline = make_pipeline(model, sampler)
    jobs = [Job(f"a cat number {i}", "dog", seed=100 + i, width=64, height=64, steps=4, scale=6.0) for i in range(4)]
    together = pipeline.latents(jobs)
    alone = torch.cat([pipeline.latents([job]) for job in jobs])
    assert ((together - alone).abs().max() / together.abs().max()).item() < 1e-5
    # (dpm_2_a makes latents of magnitude ~35 on the random tiny model, hence more ulps)
    assert (pipeline.decode(together, 4) - pipeline.decode(alone, 1)).abs().max().item() < tolerance


def test_batch_size_1_and_4_write_the_same_images(tiny_models, tmp_path):
    for sampler in ("ddim", "euler_a"):
        a, b, c = tmp_path / f"{sampler}1", tmp_path / f"{sampler}4", tmp_path / f"{sampler}d"
        common = ("--prompt", "a red house --n blur", "--images_per_prompt", "4", "--seed", "7", "--sampler", sampler)
        assert run(tiny_models, a, *common, "--batch_size", "1") == 0
        assert run(tiny_models, b, *common, "--batch_size", "4") == 0
        first, second = pngs(a), pngs(b)
        assert [meta(p)["seed"] for p in first] == [meta(p)["seed"] for p in second]
        for p, q in zip(first, second):
            assert np.abs(pixels(p) - pixels(q)).max() <= 1
        seed3 = meta(first[2])["seed"]
        assert run(tiny_models, c, "--prompt", f"a red house --n blur --d {seed3}", "--sampler", sampler) == 0
        (alone,) = pngs(c)
        assert meta(alone)["seed"] == seed3
        assert np.abs(pixels(alone) - pixels(first[2])).max() <= 1


def test_seed_semantics_follow_the_original(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "one", "--prompt", "x", "--seed", "1234") == 0
    assert [meta(p)["seed"] for p in pngs(tmp_path / "one")] == ["1234"]

    assert run(tiny_models, tmp_path / "three", "--prompt", "x", "--seed", "42", "--images_per_prompt", "3") == 0
    rng = random.Random(42)
    expected = [str(rng.randint(0, 2**32 - 1)) for _ in range(3)]
    assert sorted(meta(p)["seed"] for p in pngs(tmp_path / "three")) == sorted(expected)
    names = [p.name for p in pngs(tmp_path / "three")]
    assert [n.split("_")[-1].removesuffix(".png") for n in names] == expected  # im_<ts>_<i>_<seed>.png, in order

    # --d seeds run out: the last one repeats (as the original)
    assert run(tiny_models, tmp_path / "d", "--prompt", "x --d 5,6", "--images_per_prompt", "3") == 0
    assert [meta(p)["seed"] for p in pngs(tmp_path / "d")] == ["5", "6", "6"]

    # --iter_same_seed: one seed per --n_iter round, shared by all prompts
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    assert run(tiny_models, tmp_path / "iter", "--from_file", str(prompts), "--n_iter", "2", "--iter_same_seed",
               "--seed", "9", "--sequential_file_name") == 0
    rng = random.Random(9)
    r1, r2 = rng.randint(0, 2**32 - 1), rng.randint(0, 2**32 - 1)
    assert [meta(p)["seed"] for p in pngs(tmp_path / "iter")] == [str(r1), str(r1), str(r2), str(r2)]


def test_noise_device_cpu_matches_default_on_cpu(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "a", "--prompt", "x", "--seed", "3") == 0
    assert run(tiny_models, tmp_path / "b", "--prompt", "x", "--seed", "3", "--noise_device", "cpu") == 0
    assert np.array_equal(pixels(pngs(tmp_path / "a")[0]), pixels(pngs(tmp_path / "b")[0]))


# --- prompt sources and metadata ----------------------------------------------------------------


def test_metadata_round_trips_and_parses_as_a1111(tiny_models, tmp_path):
    prompt = "a (cat:1.2), sitting: on a mat --n ugly, blurry --l 6.5 --d 77"
    assert run(tiny_models, tmp_path, "--prompt", prompt, "--sampler", "k_euler_a") == 0
    (path,) = pngs(tmp_path)
    text = meta(path)
    assert {k: text[k] for k in ("prompt", "negative-prompt", "seed", "sampler", "steps", "scale")} == {
        "prompt": "a (cat:1.2), sitting: on a mat", "negative-prompt": "ugly, blurry", "seed": "77",
        "sampler": "k_euler_a", "steps": "3", "scale": "6.5",
    }
    a1111 = parse_a1111_parameters(text["parameters"])
    assert a1111["Prompt"] == "a (cat:1.2), sitting: on a mat"
    assert a1111["Negative prompt"] == "ugly, blurry"
    assert (a1111["Steps"], a1111["Sampler"], a1111["CFG scale"], a1111["Seed"]) == ("3", "Euler a", "6.5", "77")
    assert (a1111["Size-1"], a1111["Size-2"], a1111["Model"]) == ("64", "64", "tiny-sd1")
    assert len(a1111["Model hash"]) == 10
    assert Image.open(path).size == (64, 64)


def test_from_file_lines_with_options_and_a_malformed_line(tiny_models, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n"
        "first --w 96 --h 64 --s 2 --d 11\n"
        "\n"
        "second --n nothing --l 3 --d 12\n"
        "broken --w 100\n"
        "third --h 128 --s 4 --d 13 --nl 1.5\n"
    )
    out = tmp_path / "out"
    assert run(tiny_models, out, "--from_file", str(prompts), "--sequential_file_name") == 3  # a line skipped
    files = pngs(out)
    assert [p.name for p in files] == ["im_000001.png", "im_000002.png", "im_000003.png"]
    got = [(meta(p)["prompt"], Image.open(p).size, meta(p)["steps"], meta(p)["seed"], meta(p)["scale"]) for p in files]
    assert got == [
        ("first", (96, 64), "2", "11", "7.5"),
        ("second", (64, 64), "3", "12", "3.0"),
        ("third", (64, 128), "4", "13", "7.5"),
    ]
    assert meta(files[2])["negative-scale"] == "1.5"
    assert "prompts.txt:5: skipped" in caplog.text and "--w" in caplog.text


def test_from_module_prompter(tiny_models, tmp_path):
    module = tmp_path / "my_prompts.py"
    module.write_text(
        "def get_prompter(args, pipe, networks):\n"
        "    return iter(['from module one --d 1', 'from module two --d 2'])\n"
    )
    assert run(tiny_models, tmp_path / "out", "--from_module", str(module)) == 0
    assert sorted(meta(p)["prompt"] for p in pngs(tmp_path / "out")) == ["from module one", "from module two"]


def test_interactive_mode_reads_a_pipe_until_eof(tiny_models, tmp_path):
    cmd = [sys.executable, str(ROOT / "gen_img.py"), "--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path),
           *FAST, "--interactive", "--no_preview"]
    done = subprocess.run(cmd, input="a cat --d 1\n\na dog --d 2\n", capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Type prompt:") == 4  # three lines (one blank), then end of input
    assert sorted(meta(p)["prompt"] for p in pngs(tmp_path)) == ["a cat", "a dog"]
    written = {meta(p)["seed"]: p for p in pngs(tmp_path)}  # after each image: its seed and file
    assert [line.split("Type prompt: ")[-1] for line in done.stdout.splitlines() if "seed " in line] == [
        f"seed {seed}: {written[seed]}" for seed in ("1", "2")]


def test_log_lines_never_land_on_the_question(monkeypatch, capsys):
    """A log record while `Type prompt:` waits (a background thread's warning) starts a new line."""
    import io
    import logging

    from library.run.interactive import read_prompt

    class Typing(io.StringIO):
        def readline(self, *args):
            logging.getLogger("library.images.hashes").warning("late news")
            return "a cat\n"

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    monkeypatch.setattr(sys, "stdin", Typing())
    try:
        assert read_prompt() == "a cat"
    finally:
        logging.getLogger().removeHandler(handler)
    out, err = capsys.readouterr()
    assert out == "Type prompt: \n" and err == "late news\n"


def test_killed_run_leaves_only_complete_pngs(tiny_models, tmp_path):
    cmd = [sys.executable, str(ROOT / "gen_img.py"), "--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path),
           "--steps", "3", "--W", "256", "--H", "256", "--prompt", "x", "--images_per_prompt", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while len(pngs(tmp_path)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = pngs(tmp_path)
    assert 2 <= len(written) < 200
    for path in written:
        with Image.open(path) as image:
            image.load()  # raises on a truncated file
            assert image.size == (256, 256)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", "x", "--W", "100"], "--W 100: must be a positive multiple of 8"),
        (["--prompt", "x", "--sampler", "nope"], "--sampler nope: unknown sampler"),
        (["--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "no prompt: give --prompt, --from_file, --from_module or --interactive"),
        (["--prompt", "x", "--v2"], "--v2 was given but tiny-sd1.safetensors is an SD 1.x model"),
        (["--from_file", "/nonexistent/p.txt"], "--from_file /nonexistent/p.txt: cannot read it"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tiny_models, tmp_path, capsys, extra, message):
    try:
        code = run(tiny_models, tmp_path / "out", *extra)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and len([line for line in err if "error" in line]) == 1
    assert not pngs(tmp_path / "out") if (tmp_path / "out").exists() else True


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = gen_img.main(["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--outdir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"gen_img.py: error: --ckpt {tmp_path / 'nope.safetensors'}: no such file or folder"


@pytest.mark.parametrize("flags", [["--bf16"], ["--bf16", "--opt_channels_last"], ["--fp16", "--no_half_vae"]])
def test_half_precision_runs_on_cpu_and_stays_close_to_fp32(tiny_models, tmp_path, flags):
    assert run(tiny_models, tmp_path / "fp32", "--prompt", "x --d 5") == 0
    assert run(tiny_models, tmp_path / "half", "--prompt", "x --d 5", *flags) == 0
    a, b = pixels(pngs(tmp_path / "fp32")[0]), pixels(pngs(tmp_path / "half")[0])
    assert np.abs(a - b).mean() < 8  # same picture, half-precision rounding only


def test_half_vae_nan_falls_back_to_fp32(tiny_models, caplog):
    model = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16)
    pipeline = make_pipeline(model, "ddim")
    real_decode = model.vae.decode

    def nan_in_half(z, *a, **k):
        out = real_decode(z, *a, **k)
        if z.dtype != torch.float32:
            out.sample.fill_(float("nan"))
        return out

    model.vae.decode = nan_in_half
    with caplog.at_level(logging.WARNING, logger="library.sampling.pipeline"):
        images = pipeline.decode(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 1)
    assert torch.isfinite(images).all() and model.vae.dtype == torch.float32
    assert "switching the VAE to fp32" in caplog.text


def test_dynamic_prompts_expand_per_image_and_record_the_raw_line(tiny_models, tmp_path):
    from library.prompts.dynamic import pick_variants

    line = "a {red|green|blue} house at {e$$day|night} --d 5,6"
    assert run(tiny_models, tmp_path / "a", "--prompt", line, "--images_per_prompt", "2",
               "--sequential_file_name") == 0
    got = [(meta(p)["prompt"], meta(p)["seed"], meta(p)["raw-prompt"]) for p in pngs(tmp_path / "a")]
    expected = [(pick_variants(f"a {{red|green|blue}} house at {when}", seed), str(seed), line.removesuffix(" --d 5,6"))
                for when in ("day", "night") for seed in (5, 6)]
    assert got == expected
    assert all(p.startswith("a ") and p.split()[1] in ("red", "green", "blue") for p, _, _ in got)
    # the same seed re-creates the same pick
    assert run(tiny_models, tmp_path / "b", "--prompt", "a {red|green|blue} house at night --d 6") == 0
    assert meta(pngs(tmp_path / "b")[0])["prompt"] == expected[3][0]


def test_and_parts_are_an_attention_couple_without_a_warning(tiny_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="library.prompts.sources"):
        assert run(tiny_models, tmp_path / "and", "--prompt", "a cat AND a dog --n blur", "--seed", "3") == 0
    assert [r.getMessage() for r in caplog.records if r.name == "library.prompts.sources"] == []
    assert meta(pngs(tmp_path / "and")[0])["prompt"] == "a cat AND a dog"
    assert run(tiny_models, tmp_path / "cat", "--prompt", "a cat AND a cat --n blur", "--seed", "3") == 0
    assert run(tiny_models, tmp_path / "one", "--prompt", "a cat --n blur", "--seed", "3") == 0
    # two identical parts are the one prompt; other parts change the image
    assert np.abs(pixels(pngs(tmp_path / "cat")[0]) - pixels(pngs(tmp_path / "one")[0])).max() <= 1
    assert np.abs(pixels(pngs(tmp_path / "and")[0]) - pixels(pngs(tmp_path / "one")[0])).max() > 10


def test_ctrl_c_while_decoding_keeps_the_finished_images_only(tiny_models, tmp_path, monkeypatch, capsys):
    """Ctrl+C in the 2nd image's VAE decode: exit 130, one line, the 1st image saved whole,
    nothing of the 2nd (no file, no `.part`), no summary line."""
    from library.sampling.pipeline import Pipeline

    decode, calls = Pipeline._decode_chunk, []

    def interrupted_second(self, latents):
        calls.append(latents.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return decode(self, latents)

    monkeypatch.setattr(Pipeline, "_decode_chunk", interrupted_second)
    out = tmp_path / "out"
    assert run(tiny_models, out, "--prompt", "a cat", "--images_per_prompt", "2", "--seed", "1",
               "--sequential_file_name") == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "interrupted"
    assert "written" not in captured.out
    assert [p.name for p in out.iterdir()] == ["im_000001.png"]
    assert meta(out / "im_000001.png")["seed"]


def test_fp16_on_the_cpu_warns_once_and_names_bf16(caplog):
    """--fp16 on the CPU runs (the user's choice) but says in one warning that it is slow there
    and what to use instead; --bf16 and fp32 say nothing."""
    from library.cli.parser import parse_options
    from library.run import build

    for flags, expected in ((["--fp16"], [build.FP16_ON_CPU]), (["--bf16"], []), ([], [])):
        caplog.clear()
        options = parse_options(["--prompt", "x", "--device", "cpu", *flags])
        with caplog.at_level(logging.WARNING, logger="library.run.build"):
            runtime = build.Runtime.from_options(options.load)
        assert [r.getMessage() for r in caplog.records if r.name == "library.run.build"] == expected
        assert runtime.device.type == "cpu"
    assert "--bf16" in build.FP16_ON_CPU and "\n" not in build.FP16_ON_CPU
