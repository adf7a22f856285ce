"""LyCORIS families (LoHa, LoKr, LoCon Tucker, full diff) and DoRA: merged weights equal the
formulas, computed here independently, and un-merged == merged at any multiplier."""

from __future__ import annotations

import itertools

import pytest
import torch

from networks.lora import create_network_from_weights
from tests.helpers import fresh, outputs

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # Linear 32 -> 256
LIN_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 32 -> 32, 3x3
CONV_PATH = "down_blocks.0.resnets.0.conv1"


_SEEDS = itertools.count(1)  # every call draws from the next seed


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(next(_SEEDS))) * 0.3


def _layer(c, path):
    return c.unet.get_submodule(path)


def _merged_weight(c, sd, path, multiplier=1.0):
    """Merge `sd`, read the layer weight, restore; also check un-merged == merged outputs."""
    net = create_network_from_weights(multiplier, None, None, c.text_encoder, c.unet, weights_sd=sd)
    net.apply_to()
    hooked = outputs(c)
    net.remove()
    net.merge_to()
    weight = _layer(c, path).weight.detach().clone()
    merged = outputs(c)
    net.restore()
    for a, b in zip(hooked, merged):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    return weight


def _tucker_reference(core, left, right):
    """W[p, r, h, w] = Σ_ij core[i, j, h, w] left[i, p] right[j, r], by explicit matmuls."""
    moved = core.permute(2, 3, 0, 1)  # h, w, i, j
    return (left.T @ moved @ right).permute(2, 3, 0, 1).contiguous()


def test_loha_linear():
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    r = 4
    f = {n: _rand(*s) for n, s in {"w1_a": (256, r), "w1_b": (r, 32), "w2_a": (256, r), "w2_b": (r, 32)}.items()}
    sd = {f"{LIN}.hada_{n}": t for n, t in f.items()} | {f"{LIN}.alpha": torch.tensor(2.0)}
    got = _merged_weight(c, sd, LIN_PATH, multiplier=0.6)
    want = w + 0.6 * (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * (2.0 / r)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_loha_conv_with_tucker_cores():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 3
    shapes = {"w1_a": (r, 32), "w1_b": (r, 32), "w2_a": (r, 32), "w2_b": (r, 32), "t1": (r, r, 3, 3), "t2": (r, r, 3, 3)}
    f = {n: _rand(*s) for n, s in shapes.items()}
    sd = {f"{CONV}.hada_{n}": t for n, t in f.items()} | {f"{CONV}.alpha": torch.tensor(1.0)}
    got = _merged_weight(c, sd, CONV_PATH)
    w1 = _tucker_reference(f["t1"], f["w1_a"], f["w1_b"])
    w2 = _tucker_reference(f["t2"], f["w2_a"], f["w2_b"])
    assert w1.shape == (32, 32, 3, 3)
    assert torch.allclose(got, w + w1 * w2 / r, atol=1e-6, rtol=0)


def test_loha_conv_plain():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 2
    shapes = {"w1_a": (32, r), "w1_b": (r, 32 * 9), "w2_a": (32, r), "w2_b": (r, 32 * 9)}
    f = {n: _rand(*s) for n, s in shapes.items()}
    sd = {f"{CONV}.hada_{n}": t for n, t in f.items()}  # no alpha: scale 1
    got = _merged_weight(c, sd, CONV_PATH)
    want = w + ((f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])).reshape(32, 32, 3, 3)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_lokr_linear_decomposed_w2_is_scaled_by_alpha_over_rank():
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    r = 2
    w1 = _rand(16, 4)  # 256 = 16 * 16, 32 = 4 * 8
    w2_a, w2_b = _rand(16, r), _rand(r, 8)
    sd = {f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2_a": w2_a, f"{LIN}.lokr_w2_b": w2_b, f"{LIN}.alpha": torch.tensor(1.0)}
    got = _merged_weight(c, sd, LIN_PATH)
    assert torch.allclose(got, w + torch.kron(w1, w2_a @ w2_b) * (1.0 / r), atol=1e-6, rtol=0)


def test_lokr_full_factors_ignore_alpha():
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    w1, w2 = _rand(16, 4), _rand(16, 8)
    sd = {f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2": w2, f"{LIN}.alpha": torch.tensor(123.0)}
    got = _merged_weight(c, sd, LIN_PATH, multiplier=0.5)
    assert torch.allclose(got, w + 0.5 * torch.kron(w1, w2), atol=1e-6, rtol=0)


def test_lokr_conv_full_w2_and_decomposed_w1():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 2
    w1_a, w1_b = _rand(4, r), _rand(r, 8)  # out 32 = 4 * 8, in 32 = 8 * 4
    w2 = _rand(8, 4, 3, 3)
    sd = {f"{CONV}.lokr_w1_a": w1_a, f"{CONV}.lokr_w1_b": w1_b, f"{CONV}.lokr_w2": w2, f"{CONV}.alpha": torch.tensor(4.0)}
    got = _merged_weight(c, sd, CONV_PATH)
    kron4d = torch.kron((w1_a @ w1_b)[:, :, None, None], w2)  # the 4-D Kronecker product
    assert torch.allclose(got, w + kron4d * (4.0 / r), atol=1e-6, rtol=0)


def test_lokr_conv_with_tucker_w2():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 2
    w1 = _rand(4, 4)
    t2, w2_a, w2_b = _rand(r, r, 3, 3), _rand(r, 8), _rand(r, 8)
    sd = {
        f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_t2": t2, f"{CONV}.lokr_w2_a": w2_a, f"{CONV}.lokr_w2_b": w2_b,
        f"{CONV}.alpha": torch.tensor(1.0),
    }
    got = _merged_weight(c, sd, CONV_PATH)
    w2 = _tucker_reference(t2, w2_a, w2_b)
    assert torch.allclose(got, w + torch.kron(w1[:, :, None, None], w2) / r, atol=1e-6, rtol=0)


def test_locon_tucker_mid():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 3
    down, mid, up = _rand(r, 32, 1, 1), _rand(r, r, 3, 3), _rand(32, r, 1, 1)
    sd = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid, f"{CONV}.lora_up.weight": up}
    got = _merged_weight(c, sd, CONV_PATH)
    core = _tucker_reference(mid, up.flatten(1).T, down.flatten(1))
    assert torch.allclose(got, w + core, atol=1e-6, rtol=0)


def test_full_diff():
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    diff = _rand(256, 32)
    got = _merged_weight(c, {f"{LIN}.diff": diff}, LIN_PATH, multiplier=0.25)
    assert torch.allclose(got, w + 0.25 * diff, atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_linear(axis):
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    r = 4
    down, up = _rand(r, 32), _rand(256, r)
    magnitude = _rand(256, 1).abs() + 0.5 if axis == "output" else _rand(1, 32).abs() + 0.5
    sd = {f"{LIN}.lora_down.weight": down, f"{LIN}.lora_up.weight": up, f"{LIN}.alpha": torch.tensor(2.0),
          f"{LIN}.dora_scale": magnitude}
    got = _merged_weight(c, sd, LIN_PATH)
    direction = w + up @ down * (2.0 / r)
    norm = direction.norm(dim=1, keepdim=True) if axis == "output" else direction.norm(dim=0, keepdim=True)
    assert torch.allclose(got, magnitude * direction / norm, atol=1e-5, rtol=0)
    # multiplier m interpolates linearly between the base and the DoRA weight
    half = _merged_weight(c, sd, LIN_PATH, multiplier=0.5)
    assert torch.allclose(half, w + 0.5 * (got - w), atol=1e-5, rtol=0)


def test_dora_conv_output_axis():
    c = fresh("sd1")
    w = _layer(c, CONV_PATH).weight.detach().clone()
    r = 2
    down, up = _rand(r, 32, 3, 3), _rand(32, r, 1, 1)
    magnitude = _rand(32, 1, 1, 1).abs() + 0.5
    sd = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up, f"{CONV}.dora_scale": magnitude}
    got = _merged_weight(c, sd, CONV_PATH)
    direction = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    norm = direction.flatten(1).norm(dim=1).reshape(32, 1, 1, 1)
    assert torch.allclose(got, magnitude * direction / norm, atol=1e-5, rtol=0)


def test_peft_dora_magnitude_vector():
    c = fresh("sd1")
    w = _layer(c, LIN_PATH).weight.detach().clone()
    down, up, magnitude = _rand(4, 32), _rand(256, 4), _rand(256).abs() + 0.5
    sd = {f"unet.{LIN_PATH}.lora_A.weight": down, f"unet.{LIN_PATH}.lora_B.weight": up,
          f"unet.{LIN_PATH}.lora_magnitude_vector": magnitude}
    got = _merged_weight(c, sd, LIN_PATH)
    direction = w + up @ down
    assert torch.allclose(got, magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True), atol=1e-5)


def test_dora_unmerged_follows_weights_patched_by_another_network():
    c = fresh("sd1")
    r = 4
    dora = {f"{LIN}.lora_down.weight": _rand(r, 32), f"{LIN}.lora_up.weight": _rand(256, r),
            f"{LIN}.dora_scale": _rand(256, 1).abs() + 0.5}
    plain = {f"{LIN}.lora_down.weight": _rand(r, 32), f"{LIN}.lora_up.weight": _rand(256, r)}
    a = create_network_from_weights(0.7, None, None, c.text_encoder, c.unet, weights_sd=dora)
    b = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=plain)
    a.apply_to()
    outputs(c)  # fills a's bypass cache for the unpatched weight
    b.merge_to()  # then the base weight changes under a
    mixed = outputs(c)
    a.remove()
    a.merge_to()  # b, then a's DoRA on top of it
    both_merged = outputs(c)
    a.restore()
    b.restore()
    for x, y in zip(mixed, both_merged):
        assert torch.allclose(x, y, atol=1e-4, rtol=0)
