"""Tests for tools/show_metadata.py: safetensors headers, PNG text, damaged files, both entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.images.metadata import ImageRecord, generation_text
from library.images.output_files import save_image
from tests.helpers import ROOT
from tools.show_metadata import main


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(
        {"b": torch.zeros(4, dtype=torch.float16), "a": torch.zeros(2, 3), "c": torch.zeros(5)},
        str(path),
        metadata={"ss_network_dim": "4", "ss_tag_frequency": '{"img": {"cat": 2}}', "note": "two\nlines"},
    )
    return path


def test_safetensors_report(lora, capsys):
    assert main([str(lora)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (
        f"{lora}\n"
        "  tensors: 3 (F16: 1, F32: 2), parameters: 15\n"
        "  metadata:\n"
        "    note: two\n"
        "      lines\n"
        "    ss_network_dim: 4\n"
        "    ss_tag_frequency: {\n"
        '        "img": {\n'
        '          "cat": 2\n'
        "        }\n"
        "      }\n"
    )


def test_safetensors_without_metadata(tmp_path, capsys):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path))
    assert main([str(path)]) == 0
    assert capsys.readouterr().out == f"{path}\n  tensors: 1 (BF16: 1), parameters: 4\n  metadata: none\n"


@pytest.mark.parametrize(
    "cut, reason",
    [
        (5, r"damaged safetensors file \(shorter than its 8-byte header length\)$"),
        (20, r"damaged safetensors header \(says \d+ bytes, file has 12\); re-download it$"),
    ],
)
def test_truncated_safetensors(lora, tmp_path, capsys, cut, reason):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(lora.read_bytes()[:cut])
    assert main([str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"show_metadata: {bad}: ")
    assert re.search(reason, err)


def test_header_not_json(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"show_metadata: {bad}: damaged safetensors header (not JSON: ")
    assert err.endswith("); re-download it\n") and err.count("\n") == 1


def test_png_report(tmp_path, capsys):
    record = ImageRecord(prompt="cat, 日本\nline2", negative_prompt="bad", seed=1, sampler="euler", steps=2,
                         scale=7.5, width=8, height=8)
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "x.png", generation_text(record))
    assert main([str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}\n"
        "  text:\n"
        "    prompt: cat, 日本\n      line2\n"
        "    seed: 1\n    sampler: euler\n    steps: 2\n    scale: 7.5\n    negative-prompt: bad\n"
        "    parameters: cat, 日本\n      line2\n      Negative prompt: bad\n"
        "      Steps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 8x8\n"
        "  A1111 parameters:\n"
        "    Prompt: cat, 日本\n      line2\n"
        "    Negative prompt: bad\n    Steps: 2\n    Sampler: Euler\n    CFG scale: 7.5\n    Seed: 1\n"
        "    Size-1: 8\n    Size-2: 8\n"
    )


def test_png_without_text(tmp_path, capsys):
    path = tmp_path / "bare.png"
    Image.new("RGB", (2, 2)).save(path)
    assert main([str(path)]) == 0
    assert capsys.readouterr().out == f"{path}\n  text: none\n"


def test_mixed_files_keep_going(lora, tmp_path, capsys):
    odd = tmp_path / "notes.txt"
    odd.write_text("x")
    assert main([str(odd), str(lora)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"show_metadata: {odd}: unsupported file type .txt; "
                   "give .safetensors, .png, .webp or .jpg files\n")
    assert out.startswith(f"{lora}\n  tensors: 3")


@pytest.mark.parametrize("how", [["tools/show_metadata.py"], ["-m", "tools.show_metadata"]])
def test_entry_points(lora, tmp_path, how):
    ok = subprocess.run([sys.executable, *how, str(lora)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1] == "  tensors: 3 (F16: 1, F32: 2), parameters: 15"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    fail = subprocess.run([sys.executable, *how, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert fail.returncode == 2
    assert fail.stdout == ""
    assert fail.stderr == f"show_metadata: {bad}: damaged safetensors file (shorter than its 8-byte header length)\n"
