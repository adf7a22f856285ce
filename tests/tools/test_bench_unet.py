"""The `unet` benchmark's kernel classes: FLOPs counted independently, shares of one call."""

from __future__ import annotations

import torch

from library.models.tiny import build_tiny_components
from tools.bench import unet as unet_tool


def _conv_flops_by_hooks(unet, call) -> int:
    """2 x multiply-adds of every Conv2d in one call, from the modules' shapes."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return total


def test_kernel_rates_count_the_convolutions_and_split_the_whole_call() -> None:
    torch.manual_seed(0)
    unet = build_tiny_components("sd1").unet.eval()
    call = unet_tool.unet_call(unet, rows=2, side=16, dtype=torch.float32)
    rows = {r["class"]: r for r in unet_tool.kernel_rates(unet, call)}
    assert list(rows) == ["convolutions", "linear layers", "attention (SDPA)", "other"]
    assert round(rows["convolutions"]["gflops"] * 1e9) == _conv_flops_by_hooks(unet, call)
    assert rows["attention (SDPA)"]["gflops"] > 0 and rows["linear layers"]["gflops"] > 0
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    assert all(0 <= r["share"] <= 1 for r in rows.values())
    for r in rows.values():
        if r["gflops"]:
            assert abs(r["gflop_per_s"] - r["gflops"] / r["s"]) < 1e-6 * r["gflop_per_s"]
    text = unet_tool.rates_table(list(rows.values()), {"matmul": 100.0, "conv3x3": 90.0})
    assert text.splitlines()[0].split() == ["class", "time", "share", "GFLOP", "GFLOP/s", "of", "matmul", "peak"]
    assert text.splitlines()[-1] == "peaks: matmul 100 GFLOP/s, conv3x3 90 GFLOP/s"
