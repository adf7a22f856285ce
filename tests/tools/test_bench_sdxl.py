"""The `sdxl` benchmark on the tiny SDXL: diffusers' SDXL pipeline over our modules, U-Net
calls timed on both sides with the same inputs, the report table."""

from __future__ import annotations

import argparse

import pytest

from library.models import load_model
from tools.bench import sdxl as sdxl_tool


def test_both_sides_call_the_same_unet_with_the_pipelines_inputs(tiny_models):
    model = load_model(str(tiny_models["sdxl"]))
    ours_before = {type(p).__name__ for p in model.unet.attn_processors.values()}
    pipe = sdxl_tool._diffusers_pipeline(model)
    assert pipe.unet is model.unet and pipe.text_encoder_2 is model.text_encoder_2
    args = argparse.Namespace(steps=2, rounds=1)
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda m, a, k: seen.append(tuple(k["added_cond_kwargs"])),
                                                with_kwargs=True)
    figures = sdxl_tool._measure_size(pipe, model.unet, 64, args)
    hook.remove()
    # round 0 (warm-up) and round 1, each: a pipeline run of 2 steps and 2 direct calls of ours
    assert len(seen) == 2 * (2 + 2)
    assert set(seen) == {("text_embeds", "time_ids")}
    assert figures["calls"] == 2 and figures["rows"] == 2  # guided: uncond + cond rows
    # the ratio comes from the unrounded times; the s/call figures are rounded to 4 decimals
    assert figures["ratio"] == pytest.approx(figures["ours_s_per_call"] / figures["diffusers_s_per_call"], abs=0.005)
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == ours_before


def test_report_table():
    figures = {"dtype": "bf16", "steps": 3, "rounds": 2, "machine": {"cpu": "AMD EPYC"}, "load_s": 9.5,
               "process_wall_s": 80.1, "process_peak_rss_gb": 8.2, "weights_16bit_gb": 6.94,
               "sizes": {"512": {"ours_s_per_call": 3.5, "diffusers_s_per_call": 4.0, "ratio": 0.875}}}
    assert sdxl_tool.report(figures) == (
        "SDXL bf16, 3 steps x 2 rounds, AMD EPYC\n"
        "load 9.5 s; whole process 80.1 s, peak RSS 8.2 GB (16-bit weights 6.94 GB)\n"
        "size   ours s/call   diffusers s/call   ratio\n"
        "  512          3.5                4.0   0.875"
    )


def test_full_size_sdxl_layout_matches_the_detected_config():
    """The benchmark's SDXL configs are the ones the loader detects from such a file."""
    from tests.helpers import OPENCLIP_BIGG, SDXL_UNET

    assert {k: sdxl_tool.SDXL_UNET[k] for k in SDXL_UNET} == SDXL_UNET
    assert {k: sdxl_tool.OPENCLIP_BIGG[k] for k in OPENCLIP_BIGG} == OPENCLIP_BIGG
