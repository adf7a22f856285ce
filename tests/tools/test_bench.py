"""`python -m tools.bench`: one entry with eight commands, the shared helpers. (No import circle:
the shared module imports no benchmark and none imports the report, import-linter contracts in CI.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tools.bench.common import alternating, round_order

COMMANDS = ["pipeline", "unet", "process", "lora", "deep-shrink", "guidance", "vae-memory", "sdxl", "report"]
BENCHMARK_MODULES = ["pipeline", "unet", "process", "lora", "deep_shrink", "guidance", "vae_memory", "sdxl"]


def _python(code: str) -> str:
    """stdout of a fresh interpreter running `code` in the repository."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def test_help_lists_every_command() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "COLUMNS": "200"})
    assert "{" + ",".join(COMMANDS) + "}" in done.stdout
    listed = [found.group(1) for found in map(re.compile(r"^    (\S+)").match, done.stdout.splitlines()) if found]
    assert listed == COMMANDS  # one help line each, in this order


def test_sides_alternate_their_order_round_by_round() -> None:
    assert [round_order("ab", i) for i in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert list(alternating(("ours", "diffusers"), 2)) == [(0, "ours"), (0, "diffusers"), (1, "diffusers"),
                                                          (1, "ours")]


def test_bad_option_values_are_refused_by_the_command(capsys) -> None:
    from tools.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["unet", "--clock", "cpu", "--threads", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "python -m tools.bench unet" in err and "--clock cpu measures one thread" in err


def test_deep_shrink_cost_runs_on_the_tiny_model(tiny_models, capsys) -> None:
    from tools.bench.__main__ import main

    argv = ["deep-shrink", "--ckpt", str(tiny_models["sd1"]), "--sizes", "64", "--repeats", "1", "--dtype", "fp32"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("64 {'off': [") and "'deep_shrink': [" in line


@pytest.mark.slow
def test_vae_memory_measures_a_variant_in_a_process_of_its_own() -> None:
    """The child command of `vae-memory` runs through the entry (the full-size VAE, random
    weights, on a tiny image)."""
    from tools.bench.vae_memory import measure

    figures = measure("slices", size=32, slices=2, threads=1)
    assert figures["variant"] == "slices" and figures["seconds"] >= 0
    assert 0 < figures["before_mib"] <= figures["peak_mib"]
    assert abs(figures["rise_mib"] - (figures["peak_mib"] - figures["before_mib"])) <= 1  # each rounded


@pytest.mark.slow
def test_full_size_vae_at_1024_uses_less_memory_sliced() -> None:
    """Full-size SD VAE (random weights), 1024x1024, each variant in its own process."""
    from tools.bench.vae_memory import compare

    plain, sliced = compare(["plain", "slices"], size=1024, slices=16, encode=False)
    assert sliced["max_diff"] < 1  # levels of 255
    assert sliced["peak_mib"] < plain["peak_mib"] - 1024, (plain, sliced)


def test_lora_times_every_mode(monkeypatch, tmp_path) -> None:
    """The `lora` command's whole path on a small U-Net of the same input shapes (64x64 latents,
    768-wide text states) instead of the full-size one."""
    from tools.bench import lora
    from tools.bench.__main__ import main

    small = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # attention at 32x32 only: quick
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=768, attention_head_dim=2,
                 norm_num_groups=32)
    monkeypatch.setattr(lora, "SD15_UNET", small)
    out = tmp_path / "lora.json"
    assert main(["lora", "--runs", "1", "--rank", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["s_per_step"]) == set(lora.MODES) and result["ratio_to_none"]["none"] == 1
    assert all(t > 0 for t in result["s_per_step"].values())
