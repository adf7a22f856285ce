"""Tests for library/images.py: names, atomic saving, metadata, hashes, image input."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from library import images
from library.errors import UserError
from library.images import (
    ImageRecord,
    a1111_parameters,
    a1111_quote,
    a1111_sampler_name,
    addnet_hash_safetensors,
    generation_text,
    list_images,
    load_mask,
    load_rgb,
    lora_hashes_text,
    mask_to_tensor,
    model_hash,
    output_file_name,
    parse_a1111_parameters,
    pil_to_tensor,
    read_generation_text,
    save_image,
    tensor_to_pil,
    timestamp_now,
)

# ----------------------------------------------------------------------------- names


def test_default_name():
    assert output_file_name(timestamp="20240102030405", index=3, seed=42) == "im_20240102030405_003_42.png"


def test_default_name_highres_stages():
    assert output_file_name(timestamp="20240102030405", index=3, seed=42, highres_stage="0") == "im_20240102030405_0003_42.png"
    assert output_file_name(timestamp="20240102030405", index=12, seed=7, highres_stage="1") == "im_20240102030405_1012_7.png"


def test_sequential_name():
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=7) == "im_000007.png"
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=7, highres_stage="1") == "im_1000007.png"


def test_original_name_uses_source_stem():
    assert output_file_name(timestamp="t", index=0, seed=1, original_name="/in/photo.v2.jpg") == "photo.v2.png"
    assert output_file_name(timestamp="t", index=0, seed=1, sequential=3, original_name="a.webp") == "a.png"


def test_prompt_file_name():
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat") == "cat.png"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.webp") == "cat.webp"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.PNG") == "cat.PNG"
    assert output_file_name(timestamp="t", index=0, seed=1, prompt_file_name="cat.jpg") == "cat.jpg.png"
    both = output_file_name(timestamp="t", index=0, seed=1, sequential=2, original_name="x.png", prompt_file_name="dog")
    assert both == "dog.png"


def test_timestamp_now_format():
    assert re.fullmatch(r"\d{14}", timestamp_now())


# ----------------------------------------------------------------------------- saving


def _img(color=(10, 20, 30), size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_save_never_overwrites(tmp_path):
    first = save_image(_img((1, 2, 3)), tmp_path, "a.png", {"k": "1"})
    second = save_image(_img((4, 5, 6)), tmp_path, "a.png", {"k": "2"})
    third = save_image(_img((7, 8, 9)), tmp_path, "a.png", {"k": "3"})
    assert [first.name, second.name, third.name] == ["a.png", "a_1.png", "a_2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_1.png", "a_2.png"]
    assert Image.open(first).getpixel((0, 0)) == (1, 2, 3)
    assert Image.open(second).getpixel((0, 0)) == (4, 5, 6)
    assert read_generation_text(third) == {"k": "3"}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_saved_file_mode_follows_umask(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    saved = save_image(_img(), tmp_path, "a.png", {})
    assert saved.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_save_creates_outdir(tmp_path):
    out = save_image(_img(), tmp_path / "x" / "y", "b.png", {})
    assert out == tmp_path / "x" / "y" / "b.png"


def test_save_outdir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^--outdir .*f: is not a folder; give a folder path$"):
        save_image(_img(), tmp_path / "f", "a.png", {})


@pytest.mark.parametrize("name", ["sub/a.png", "..", "", "a\\b.png"])
def test_save_rejects_paths_as_names(tmp_path, name):
    with pytest.raises(UserError, match="must be a plain file name; remove folders from --f"):
        save_image(_img(), tmp_path, name, {})


def test_save_concurrent_same_name(tmp_path):
    results: list[Path] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        path = save_image(_img((i, i, i)), tmp_path, "same.png", {"i": str(i)})
        with lock:
            results.append(path)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"] + [f"same_{n}.png" for n in range(1, 8)]
    for path in results:
        i = int(read_generation_text(path)["i"])
        assert Image.open(path).getpixel((0, 0)) == (i, i, i)


def _failing_png_writer(exc: BaseException):
    def write(im, fp, filename):
        fp.write(b"\x89PNG\r\n\x1a\n half")  # a partial file, then the failure
        raise exc

    return write


@pytest.mark.parametrize("exc", [RuntimeError("encoder exploded"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, exc):
    keep = save_image(_img((9, 9, 9)), tmp_path, "a.png", {})
    monkeypatch.setitem(Image.SAVE, "PNG", _failing_png_writer(exc))
    with pytest.raises(type(exc)):
        save_image(_img(), tmp_path, "a.png", {})
    with pytest.raises(type(exc)):
        save_image(_img(), tmp_path, "new.png", {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    monkeypatch.undo()
    assert Image.open(keep).getpixel((0, 0)) == (9, 9, 9)


def test_disk_error_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(Image.SAVE, "PNG", _failing_png_writer(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match=r"disk full while writing a\.png; free some space \(nothing partial was left\)$"):
        save_image(_img(), tmp_path, "a.png", {})
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_not_a_png(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    real = Image.SAVE["PNG"]

    def spy(im, fp, filename):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(im, fp, filename)

    monkeypatch.setitem(Image.SAVE, "PNG", spy)
    save_image(_img(), tmp_path, "a.png", {})
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].startswith(".a.png.") and seen[0][0].endswith(".part")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_save_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    a = save_image(_img((1, 1, 1)), tmp_path, "a.png", {"x": "1"})
    b = save_image(_img((2, 2, 2)), tmp_path, "a.png", {"x": "2"})
    assert (a.name, b.name) == ("a.png", "a_1.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_1.png"]
    assert read_generation_text(a) == {"x": "1"} and read_generation_text(b) == {"x": "2"}


def test_webp_stores_parameters_in_exif(tmp_path):
    text = {"prompt": "p", "parameters": "日本 cat\nSteps: 20, Sampler: Euler, CFG scale: 7"}
    path = save_image(_img(), tmp_path, "x.webp", text)
    assert path.name == "x.webp"
    with Image.open(path) as im:
        assert im.format == "WEBP"
    assert read_generation_text(path) == {"parameters": text["parameters"]}


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
        "Lora hashes": lora_hashes_text([("style", "0123456789ab"), ("char,x:y", "ba9876543210")]),
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
    path = save_image(_img(), tmp_path, "rt.png", text)
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


# ----------------------------------------------------------------------------- hashes


def test_model_hash_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: spans several 1 MiB chunks
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    (tmp_path / "abc").write_bytes(b"abc")
    assert model_hash(tmp_path / "abc") == "ba7816bf8f"


def test_addnet_hash_skips_header(tmp_path):
    header = b'{"__metadata__":{"a":"b"}}'
    path = tmp_path / "l.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"tensor bytes")
    assert addnet_hash_safetensors(path) == hashlib.sha256(b"tensor bytes").hexdigest()
    with pytest.raises(UserError, match=r"short\.safetensors: not a safetensors file \(shorter than 8 bytes\); replace it$"):
        (tmp_path / "short.safetensors").write_bytes(b"abc")
        addnet_hash_safetensors(tmp_path / "short.safetensors")


def test_addnet_hash_real_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(path), metadata={"ss_network_dim": "4"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash_safetensors(path) == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert addnet_hash_safetensors(path) == hashlib.sha256(torch.arange(6, dtype=torch.float32).numpy().tobytes()).hexdigest()


def test_missing_model_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.safetensors: cannot read it \(No such file or directory\); check the path$"):
        model_hash(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- image input


def test_list_images_string_order(tmp_path):
    for name in ["2.jpg", "10.jpg", "1.jpg", "b.PNG", "a.Webp", "c.jpeg", "notes.txt", "B.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["1.jpg", "10.jpg", "2.jpg", "B.png", "a.Webp", "b.PNG", "c.jpeg"]


def test_list_images_single_file_and_errors(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"")
    assert list_images(tmp_path / "x.bmp") == [tmp_path / "x.bmp"]
    with pytest.raises(UserError, match=r"^--image_path .*missing: no such file or folder; check the path$"):
        list_images(tmp_path / "missing")
    with pytest.raises(UserError, match=r"^--mask_image .*: the folder has no \.png/\.jpg/\.jpeg/\.webp images; add some or pick another$"):
        list_images(tmp_path, option="--mask_image")


def _save(tmp_path: Path, name: str, image: Image.Image, **kw) -> Path:
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_load_rgb_modes(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 128)])
    assert list(load_rgb(_save(tmp_path, "rgba.png", rgba)).getdata()) == [(255, 255, 255), (255, 127, 127)]
    la = Image.new("LA", (2, 1))
    la.putdata([(100, 0), (100, 255)])
    assert list(load_rgb(_save(tmp_path, "la.png", la)).getdata()) == [(255, 255, 255), (100, 100, 100)]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putdata([0, 1])
    assert list(load_rgb(_save(tmp_path, "p.png", pal, transparency=0)).getdata()) == [(255, 255, 255), (10, 20, 30)]
    grey = Image.new("L", (1, 1), 77)
    assert list(load_rgb(_save(tmp_path, "l.png", grey)).getdata()) == [(77, 77, 77)]
    deep = Image.new("I;16", (3, 1))
    deep.putdata([65535, 32896, 1000])
    out = load_rgb(_save(tmp_path, "16.png", deep))
    assert out.mode == "RGB" and list(out.getdata()) == [(255, 255, 255), (128, 128, 128), (4, 4, 4)]
    assert load_mask(tmp_path / "16.png").getdata()[2] == 4


def test_load_rgb_applies_exif_rotation(tmp_path):
    image = Image.new("RGB", (4, 2), (200, 100, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = _save(tmp_path, "r.jpg", image, exif=exif.tobytes())
    assert load_rgb(path).size == (2, 4)


def test_load_mask_modes(tmp_path):
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(255, 0, 0), (10, 200, 30)])
    mask = load_mask(_save(tmp_path, "m.png", rgb))
    assert mask.mode == "L" and list(mask.getdata()) == [76, 124]
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 255)])
    assert list(load_mask(_save(tmp_path, "ma.png", rgba)).getdata()) == [0, 128, 255]  # alpha is the mask
    opaque = Image.new("RGBA", (1, 1), (255, 0, 0, 255))
    assert list(load_mask(_save(tmp_path, "mo.png", opaque)).getdata()) == [76]  # fully opaque: luma


def test_corrupt_image_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(UserError, match=r"^.*bad\.jpg: not an image or damaged \(.*\); replace or remove it$"):
        load_rgb(bad)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.getvalue()[:60])
    with pytest.raises(UserError, match=r"cut\.png: not an image or damaged"):
        load_mask(cut)
    with pytest.raises(UserError, match=r"gone\.png: no such file; check the path$"):
        load_rgb(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- tensors


def test_pil_to_tensor_values():
    image = Image.new("RGB", (3, 2))
    image.putdata([(0, 255, 51), (255, 0, 0), (0, 0, 0), (1, 2, 3), (4, 5, 6), (7, 8, 9)])
    batch = pil_to_tensor([image, image])
    assert batch.shape == (2, 3, 2, 3) and batch.dtype == torch.float32
    assert batch[0, :, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(-0.6, abs=1e-7)]
    assert batch[1, 0, 0].tolist() == [-1.0, 1.0, -1.0]


def test_pil_to_tensor_resizes_and_checks_sizes():
    a, b = Image.new("RGB", (8, 4)), Image.new("RGB", (4, 4))
    assert pil_to_tensor([a, b], size=(4, 2)).shape == (2, 3, 2, 4)
    with pytest.raises(ValueError, match="images differ in size"):
        pil_to_tensor([a, b])


def test_round_trip_all_byte_values_exact():
    values = list(range(256))
    image = Image.new("RGB", (256, 1))
    image.putdata([(v, 255 - v, (v * 7) % 256) for v in values])
    assert list(tensor_to_pil(pil_to_tensor(image))[0].getdata()) == list(image.getdata())


def test_tensor_to_pil_rounding_and_clamp():
    batch = torch.tensor([[[[-1.0, 0.0, -0.5, 2.0, -3.0]]]]).expand(1, 3, 1, 5).clone()
    out = tensor_to_pil(batch)[0]
    assert out.mode == "RGB" and [p[0] for p in out.getdata()] == [0, 128, 64, 255, 0]
    grey = tensor_to_pil(torch.zeros(2, 1, 1, 1))
    assert [g.mode for g in grey] == ["L", "L"] and grey[0].getpixel((0, 0)) == 128
    with pytest.raises(ValueError, match=r"expected an N x \(1\|3\) x H x W tensor, got shape \(3, 4, 4\)"):
        tensor_to_pil(torch.zeros(3, 4, 4))


def test_mask_to_tensor():
    mask = Image.new("L", (2, 1))
    mask.putdata([0, 255])
    t = mask_to_tensor([mask], size=(2, 1))
    assert t.shape == (1, 1, 1, 2) and t.flatten().tolist() == [0.0, 1.0]


def test_module_does_not_import_torch_eagerly():
    source = Path(images.__file__).read_text()
    assert "\nimport torch" not in source
