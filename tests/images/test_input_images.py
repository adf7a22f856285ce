"""Tests for library/images/input_images.py: loading input images and masks, image <-> tensor."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.images import hashes, input_images, output_files
from library.images import metadata as image_metadata
from library.images.input_images import list_images, load_mask, load_rgb, mask_to_tensor, pil_to_tensor, tensor_to_pil

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


@pytest.mark.parametrize("module", [output_files, image_metadata, hashes, input_images])
def test_module_does_not_import_torch_eagerly(module):
    source = Path(module.__file__).read_text()
    assert "\nimport torch" not in source
