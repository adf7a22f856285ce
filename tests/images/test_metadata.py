"""Tests for library/images/metadata.py: the metadata written into images, and reading it back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from library.errors import UserError
from library.images.metadata import (
    ImageRecord,
    a1111_parameters,
    a1111_quote,
    a1111_sampler_name,
    generation_text,
    parse_a1111_parameters,
    read_generation_text,
)
from library.images.output_files import save_image

# ----------------------------------------------------------------------------- metadata writer

RECORD = ImageRecord(
    prompt="1girl, solo",
    negative_prompt="lowres",
    seed=123,
    sampler="dpmsolver++",
    karras=True,
    steps=28,
    scale=7.5,
    width=512,
    height=768,
    model_name="tiny",
    model_hash="abcdef0123",
    clip_skip=2,
    strength=0.6,
    extra={
        "Hires upscale": 2.0,
        "Hires steps": 14,
        "Lora hashes": "style: 0123456789ab, charxy: ba9876543210",
    },
)


def test_generation_text_exact():
    assert generation_text(RECORD) == {
        "prompt": "1girl, solo",
        "seed": "123",
        "sampler": "dpmsolver++",
        "steps": "28",
        "scale": "7.5",
        "negative-prompt": "lowres",
        "parameters": "1girl, solo\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, "
        "Seed: 123, Size: 512x768, Model hash: abcdef0123, Model: tiny, Denoising strength: 0.6, Clip skip: 2, "
        'Hires upscale: 2, Hires steps: 14, Lora hashes: "style: 0123456789ab, charxy: ba9876543210"',
    }
    assert list(generation_text(RECORD)) == ["prompt", "seed", "sampler", "steps", "scale", "negative-prompt", "parameters"]


def test_generation_text_all_original_keys_in_order():
    record = ImageRecord(
        prompt="p", negative_prompt="n", seed=1, sampler="k_euler_a", steps=20, scale=7.0, width=64, height=64,
        negative_scale=3.5, clip_prompt="c", raw_prompt="{a|b}",
    )
    text = generation_text(record)
    assert list(text.items())[:-1] == [
        ("prompt", "p"), ("seed", "1"), ("sampler", "k_euler_a"), ("steps", "20"), ("scale", "7.0"),
        ("negative-prompt", "n"), ("negative-scale", "3.5"), ("clip-prompt", "c"), ("raw-prompt", "{a|b}"),
    ]
    assert text["parameters"] == "p\nNegative prompt: n\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"


def test_generation_text_minimal_and_empty_negative():
    base = dict(prompt="cat", seed=5, sampler="ddim", steps=10, scale=5, width=512, height=512, clip_skip=1)
    assert generation_text(ImageRecord(**base)) == {
        "prompt": "cat", "seed": "5", "sampler": "ddim", "steps": "10", "scale": "5",
        "parameters": "cat\nSteps: 10, Sampler: DDIM, CFG scale: 5, Seed: 5, Size: 512x512",
    }
    text = generation_text(ImageRecord(**base, negative_prompt=""))
    assert text["negative-prompt"] == ""
    assert text["parameters"] == "cat\nSteps: 10, Sampler: DDIM, CFG scale: 5, Seed: 5, Size: 512x512"


def test_a1111_value_quoting_and_bare_flags():
    record = ImageRecord(prompt="x", seed=1, sampler="euler", steps=1, scale=1.0, width=8, height=8,
                         model_name="my, model: v2", extra=(("Tiling", "Tiling"), ("Skipped", None), ("Note", 'say "hi"\nthen')))
    assert a1111_parameters(record) == (
        'x\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 8x8, Model: "my, model: v2", Tiling, '
        'Note: "say \\"hi\\"\\nthen"'
    )
    assert a1111_quote("plain (text)") == "plain (text)"
    assert a1111_quote("a:b") == '"a:b"'
    assert a1111_quote("日本,") == '"日本,"'


@pytest.mark.parametrize(
    "ours, karras, theirs",
    [
        ("ddim", False, "DDIM"), ("pndm", False, "PLMS"), ("lms", False, "LMS"), ("k_lms", False, "LMS"),
        ("euler", False, "Euler"), ("k_euler", False, "Euler"), ("euler_a", False, "Euler a"),
        ("k_euler_a", False, "Euler a"), ("heun", False, "Heun"), ("dpm_2", False, "DPM2"), ("k_dpm_2", False, "DPM2"),
        ("dpm_2_a", False, "DPM2 a"), ("k_dpm_2_a", False, "DPM2 a"), ("dpmsolver", False, "DPM++ 2M"),
        ("dpmsolver++", False, "DPM++ 2M"), ("dpmsingle", False, "DPM++ SDE"), ("unipc", False, "UniPC"),
        ("lcm", False, "LCM"), ("dpmsolver++", True, "DPM++ 2M Karras"), ("dpmsolver++_karras", False, "DPM++ 2M Karras"),
        ("k_dpm_2_karras", False, "DPM2 Karras"), ("Restart", False, "Restart"), ("DPM++ 2M Karras", True, "DPM++ 2M Karras"),
    ],
)
def test_sampler_names(ours, karras, theirs):
    assert a1111_sampler_name(ours, karras) == theirs


def test_record_extra_is_frozen_tuple():
    record = ImageRecord(prompt="p", seed=1, sampler="ddim", steps=1, scale=1, width=8, height=8, extra={"A": 1, "B": "x"})
    assert record.extra == (("A", 1), ("B", "x"))
    with pytest.raises(AttributeError):
        record.seed = 2  # type: ignore[misc]


# ----------------------------------------------------------------------------- metadata round trips


def test_png_round_trip_every_key(tmp_path):
    record = ImageRecord(
        prompt="masterpiece, 日本の猫: (cute:1.2)\nsecond line ✓", negative_prompt="lowres,\nbad: hands",
        seed=4294967295, sampler="k_euler_a", steps=30, scale=7.5, width=640, height=448, negative_scale=2.0,
        clip_prompt="ünïcode", raw_prompt="{cat|dog}, 日本", model_name="tiny", model_hash="0123456789",
    )
    text = generation_text(record)
    path = save_image(Image.new("RGB", (8, 6), (10, 20, 30)), tmp_path, "rt.png", text)
    back = read_generation_text(path)
    assert back == text
    assert list(back) == list(text)
    raw = path.read_bytes()
    assert b"tEXtseed\x004294967295" in raw  # latin-1 values as tEXt
    assert b"iTXtprompt\x00" in raw  # other unicode as iTXt


def _check_parsed(record: ImageRecord) -> None:
    parsed = parse_a1111_parameters(generation_text(record)["parameters"])
    assert parsed["Prompt"] == record.prompt
    assert parsed["Negative prompt"] == (record.negative_prompt or "")
    assert parsed["Steps"] == str(record.steps)
    assert parsed["Sampler"] == a1111_sampler_name(record.sampler, record.karras)
    assert parsed["CFG scale"] == "7.5"
    assert parsed["Seed"] == str(record.seed)
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(record.width), str(record.height))
    assert parsed["Model hash"] == record.model_hash
    assert "Size" not in parsed


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("a cat", "ugly"),
        ("a, b: c", "d: e, f"),
        ("line one,\nline: two\n\nline four", "neg one\nneg, two"),
        ("cat", ""),
        ("cat", None),
        ("", ""),
        ('quotes "x", backslash \\ and {json: 1}', "Steps: 1, Sampler: a, CFG scale: 2"),
    ],
)
def test_parse_our_parameters(prompt, negative):
    _check_parsed(ImageRecord(prompt=prompt, negative_prompt=negative, seed=77, sampler="dpmsolver++", karras=True,
                              steps=25, scale=7.5, width=512, height=704, model_hash="fedcba9876", model_name="a, b"))


def test_parse_our_parameters_extras():
    parsed = parse_a1111_parameters(generation_text(RECORD)["parameters"])
    assert parsed == {
        "Prompt": "1girl, solo", "Negative prompt": "lowres", "Steps": "28", "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7.5", "Seed": "123", "Size-1": "512", "Size-2": "768", "Model hash": "abcdef0123",
        "Model": "tiny", "Denoising strength": "0.6", "Clip skip": "2", "Hires upscale": "2", "Hires steps": "14",
        "Lora hashes": "style: 0123456789ab, charxy: ba9876543210",
    }


_LINE = st.text(alphabet='ab ,:"\\()[]{}<>=|-_.!\'日本✓é0123456789', max_size=20).filter(
    lambda s: s == s.strip() and not s.startswith("Negative prompt:")
)
_PROMPT = st.lists(_LINE, min_size=1, max_size=4).map("\n".join).filter(lambda s: not s.startswith("\n"))


@settings(max_examples=150, deadline=None)
@given(prompt=_PROMPT, negative=_PROMPT, seed=st.integers(0, 2**32 - 1))
def test_parse_our_parameters_property(prompt, negative, seed):
    _check_parsed(ImageRecord(prompt=prompt, negative_prompt=negative, seed=seed, sampler="euler_a", steps=20,
                              scale=7.5, width=512, height=512, model_hash="0123456789"))


REFERENCE_EXAMPLE = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b
"""


def test_parse_reference_example():
    assert parse_a1111_parameters(REFERENCE_EXAMPLE) == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate",
        "Negative prompt": "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
        "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing",
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
        "Size-1": "512", "Size-2": "512", "Model hash": "45dee52b",
    }


def test_parse_forge_example_with_defaults():
    text = ("p\nSteps: 40, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 3458746777, Size: 1024x1024, "
            "Model hash: 7873076e72, Model: SDXL_myown_Sevenof9_VAE, Denoising strength: 0.6, Clip skip: 1, "
            "Hires upscale: 2, Hires steps: 20, Hires upscaler: R-ESRGAN 4x+, Extra noise: 0.1, "
            "Version: f0.0.17v1.8.0rc-latest-278-gbfee03d8")
    parsed = parse_a1111_parameters(text, with_defaults=True)
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+"
    assert parsed["Version"] == "f0.0.17v1.8.0rc-latest-278-gbfee03d8"
    assert parsed["Clip skip"] == "1" and parsed["Schedule type"] == "Automatic" and parsed["RNG"] == "GPU"
    assert parsed["Hires sampler"] == "Use same sampler" and parsed["Hires resize-1"] == "0"
    assert "Schedule type" not in parse_a1111_parameters(text)


def test_parse_last_line_needs_three_params():
    assert parse_a1111_parameters("a cat\nSteps: 20, Seed: 1") == {"Prompt": "a cat\nSteps: 20, Seed: 1", "Negative prompt": ""}
    assert parse_a1111_parameters("  a\n  Negative prompt: b  \nc\nSteps: 1, Seed: 2, Size: 3x4") == {
        "Prompt": "a", "Negative prompt": "b\nc", "Steps": "1", "Seed": "2", "Size-1": "3", "Size-2": "4",
    }


def test_read_generation_text_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"bad\.png: not an image or damaged \(.*\); check the file$"):
        read_generation_text(bad)
    with pytest.raises(UserError, match=r"missing\.png: no such file; check the path$"):
        read_generation_text(tmp_path / "missing.png")


def test_empty_values_as_the_web_uis_reader():
    # A1111's reader indexes value[0] and skips a key whose value is empty; a quoted "" is kept as "".
    text = 'a cat\nSteps: 20, Sampler: , Seed: 3, Model: , Size: 64x64, VAE: ""'
    assert parse_a1111_parameters(text) == {
        "Prompt": "a cat", "Negative prompt": "", "Steps": "20", "Seed": "3", "Size-1": "64", "Size-2": "64",
        "VAE": "",
    }
    record = ImageRecord(prompt="a cat", negative_prompt="", seed=3, sampler="euler", steps=20, scale=7.0,
                         width=64, height=64, model_name="", model_hash="", extra={"VAE": "", "Eta": 0.0})
    written = a1111_parameters(record)
    assert written == "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Eta: 0"
    assert parse_a1111_parameters(written) == {
        "Prompt": "a cat", "Negative prompt": "", "Steps": "20", "Sampler": "Euler", "CFG scale": "7", "Seed": "3",
        "Size-1": "64", "Size-2": "64", "Eta": "0",
    }
