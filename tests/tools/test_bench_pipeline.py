"""Smoke test of `python -m tools.bench pipeline`: its whole code path on the tiny SD1 model, in seconds."""

from __future__ import annotations

import json
import math

from tools.bench import pipeline
from tools.bench.__main__ import main


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmark_reports_every_figure(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["pipeline", "--ckpt", str(tiny_models["sd1"]), "--device", "cpu", "--size", "64", "--steps", "3",
            "--runs", "1", "--load_runs", "1", "--json", str(out)]
    assert main(argv) == 0

    result = json.loads(out.read_text())
    for side in ("ours", "diffusers"):
        for key in pipeline.FIGURES:
            assert _positive(result[side][key]), (side, key, result[side][key])
        assert result[side]["steps"] == 3
    for key in pipeline.LOAD_FIGURES:
        assert _positive(result["load"][key]), (key, result["load"][key])
    assert _positive(result["unet_direct"]["unet_s_per_step"])
    assert _positive(result["flops"]["unet_per_step"])
    for key in [*pipeline.FIGURES, "load_vs_safetensors", "load_returned_vs_safetensors", "unet_vs_direct",
                "whole_vs_unet_x_steps"]:
        assert _positive(result["ratios"][key]), (key, result["ratios"].get(key))
    assert result["checks"]["images_finite"] is True
    # Same weights, scheduler and seeds: both pipelines make the same image.
    assert result["checks"]["max_abs_diff_vs_diffusers"] < 1e-3
    assert result["machine"]["cpu"]
    assert "U-Net s/step" in capsys.readouterr().out


def test_sdpa_flops_are_counted():
    """The CPU SDPA kernel is missing from PyTorch's FLOP table; the benchmark adds it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from library.models.tiny import build_tiny_components

    unet = build_tiny_components("sd1").unet
    inputs = {"sample": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 77, 32)}
    flops = pipeline.count_unet_flops(unet, inputs, torch.tensor(10))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(inputs["sample"], torch.tensor(10), encoder_hidden_states=inputs["encoder_hidden_states"])
    attention_free = counter.get_total_flops()
    assert flops > attention_free > 0
