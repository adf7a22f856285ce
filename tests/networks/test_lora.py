"""LoRA semantics: analytic layer outputs, un-merged == merged == pre-calc, exact restore,
several networks at once, multipliers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.lora import LoRANetwork, create_network_from_weights
from networks.lora_files import random_kohya_state_dict, write_kohya_lora
from tests.helpers import assert_same_weights, fresh, no_hooks, outputs, unet_inputs, weights


class Toy(nn.Module):
    """One Linear and one strided 3x3 conv: the two shapes of target."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 5, 3, stride=2, padding=1)


def _toy_lora(rank: int = 3, alpha: float | None = 1.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sd = {
        "lora_unet_lin.lora_down.weight": torch.randn(rank, 8, generator=g),
        "lora_unet_lin.lora_up.weight": torch.randn(6, rank, generator=g),
        "lora_unet_conv.lora_down.weight": torch.randn(rank, 4, 3, 3, generator=g),
        "lora_unet_conv.lora_up.weight": torch.randn(5, rank, 1, 1, generator=g),
    }
    if alpha is not None:
        sd["lora_unet_lin.alpha"] = torch.tensor(alpha)
        sd["lora_unet_conv.alpha"] = torch.tensor(alpha)
    return sd


def test_linear_and_conv_outputs_match_the_lora_formula():
    toy = Toy()
    sd = _toy_lora(rank=3, alpha=1.5)
    x = torch.randn(2, 7, 8)
    image = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        base_lin, base_conv = toy.lin(x), toy.conv(image)
        net = create_network_from_weights(0.7, None, None, None, toy, weights_sd=sd)
        net.apply_to()
        got_lin, got_conv = toy.lin(x), toy.conv(image)
    scale = 0.7 * 1.5 / 3
    down, up = sd["lora_unet_lin.lora_down.weight"], sd["lora_unet_lin.lora_up.weight"]
    want_lin = base_lin + scale * (x @ down.T @ up.T)
    cdown, cup = sd["lora_unet_conv.lora_down.weight"], sd["lora_unet_conv.lora_up.weight"]
    want_conv = base_conv + scale * F.conv2d(F.conv2d(image, cdown, stride=2, padding=1), cup)
    assert torch.allclose(got_lin, want_lin, atol=1e-5, rtol=0)
    assert torch.allclose(got_conv, want_conv, atol=1e-5, rtol=0)
    assert got_conv.shape == (2, 5, 5, 5)


def test_missing_alpha_means_alpha_equals_rank():
    toy = Toy()
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = toy.lin(x)
        net = create_network_from_weights(1.0, None, None, None, toy, weights_sd=_toy_lora(alpha=None))
        net.apply_to()
        got = toy.lin(x)
    sd = _toy_lora(alpha=None)
    want = base + x @ sd["lora_unet_lin.lora_down.weight"].T @ sd["lora_unet_lin.lora_up.weight"].T
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert net.modules[0].adapter.scale == 1.0


def test_merged_weight_is_base_plus_scaled_up_down():
    toy = Toy()
    w_lin, w_conv = toy.lin.weight.detach().clone(), toy.conv.weight.detach().clone()
    sd = _toy_lora(rank=3, alpha=6.0)
    net = create_network_from_weights(0.5, None, None, None, toy, weights_sd=sd)
    net.merge_to()
    scale = 0.5 * 6.0 / 3
    want_lin = w_lin + scale * sd["lora_unet_lin.lora_up.weight"] @ sd["lora_unet_lin.lora_down.weight"]
    up = sd["lora_unet_conv.lora_up.weight"].flatten(1)
    want_conv = w_conv + scale * (up @ sd["lora_unet_conv.lora_down.weight"].flatten(1)).reshape(5, 4, 3, 3)
    assert torch.allclose(toy.lin.weight, want_lin, atol=1e-6, rtol=0)
    assert torch.allclose(toy.conv.weight, want_conv, atol=1e-6, rtol=0)
    net.restore()
    assert torch.equal(toy.lin.weight, w_lin) and torch.equal(toy.conv.weight, w_conv)


def test_unmerged_merged_and_precalc_agree_on_tiny_sd1(tmp_path):
    c = fresh("sd1")
    path = tmp_path / "lora.safetensors"
    write_kohya_lora(path, c.text_encoder, c.unet, rank=4, seed=3, alpha=2.0, conv=True)
    before = weights(c.unet, c.text_encoder)
    base_unet, base_te = outputs(c)
    net = create_network_from_weights(0.8, path, None, c.text_encoder, c.unet)
    assert net.summary() == {"lora": 97, "unet": 79, "text_encoder": 18}

    net.apply_to()
    hooked = outputs(c)
    assert_same_weights(before, c.unet, c.text_encoder)  # un-merged touches no weight
    net.pre_calculation()
    assert no_hooks(c.unet, c.text_encoder)  # pre-calc runs at merged speed: no hooks left
    precalc = outputs(c)
    net.restore()
    assert_same_weights(before, c.unet, c.text_encoder)
    assert not no_hooks(c.unet)  # back to un-merged
    again = outputs(c)
    net.remove()
    assert no_hooks(c.unet, c.text_encoder)
    net.merge_to()
    merged = outputs(c)
    net.restore()
    assert_same_weights(before, c.unet, c.text_encoder)

    for got in (precalc, merged, again):
        for a, b in zip(hooked, got):
            assert torch.allclose(a, b, atol=1e-4, rtol=0)
    # the LoRA does change both outputs
    assert (hooked[0] - base_unet).abs().max() > 0.05
    assert (hooked[1] - base_te).abs().max() > 0.05
    # and after everything the model is the original model
    for a, b in zip(outputs(c), (base_unet, base_te)):
        assert torch.equal(a, b)


def test_set_multiplier_zero_gives_the_base_output_in_every_mode():
    c = fresh("sd1")
    base = outputs(c)
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=1)
    net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    net.apply_to()
    net.set_multiplier(0.0)
    for a, b in zip(outputs(c), base):
        assert torch.equal(a, b)
    net.pre_calculation()
    for a, b in zip(outputs(c), base):
        assert torch.equal(a, b)
    net.remove()


def test_set_multiplier_while_precalculated_recomputes_the_weights():
    c = fresh("sd1")
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=2, alpha=3.0)
    net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    net.apply_to()
    net.set_multiplier(0.4)
    want = outputs(c)
    net.set_multiplier(1.0)
    net.pre_calculation()
    net.set_multiplier(0.4)
    got = outputs(c)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    net.remove()


def _merged_copy_weights(c, nets: list[tuple[dict, float]]) -> None:
    """Write W + Σ m * alpha/rank * up @ down into the models by hand (the reference)."""
    layers = {f"lora_unet_{n.replace('.', '_')}": m for n, m in c.unet.named_modules()}
    layers |= {f"lora_te_text_model_{n.replace('.', '_')}": m for n, m in c.text_encoder.named_modules()}
    with torch.no_grad():
        for sd, mult in nets:
            for key, down in sd.items():
                if not key.endswith(".lora_down.weight"):
                    continue
                name = key[: -len(".lora_down.weight")]
                up = sd[f"{name}.lora_up.weight"]
                alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
                layer = layers[name]
                delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
                layer.weight += mult * alpha / down.shape[0] * delta


def test_two_networks_compose_in_every_mode_and_restore_in_any_order():
    c = fresh("sd1")
    sd_a = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=10, alpha=2.0)
    sd_b = random_kohya_state_dict(c.text_encoder, c.unet, rank=2, seed=11, conv=True)
    reference = fresh("sd1")
    _merged_copy_weights(reference, [(sd_a, 0.5), (sd_b, -0.3)])
    want = outputs(reference)

    before = weights(c.unet, c.text_encoder)
    a = create_network_from_weights(0.5, None, None, c.text_encoder, c.unet, weights_sd=sd_a)
    b = create_network_from_weights(-0.3, None, None, c.text_encoder, c.unet, weights_sd=sd_b)
    a.apply_to()
    b.apply_to()
    hooked = outputs(c)
    a.pre_calculation()  # one pre-calculated, one un-merged
    mixed = outputs(c)
    b.merge_to()
    merged = outputs(c)
    for got in (hooked, mixed, merged):
        for x, y in zip(got, want):
            assert torch.allclose(x, y, atol=1e-4, rtol=0)
    a.remove()  # first in, first out: b's patch must survive a's restore
    only_b = outputs(c)
    b.restore()
    b.remove()
    assert_same_weights(before, c.unet, c.text_encoder)
    assert no_hooks(c.unet, c.text_encoder)

    reference_b = fresh("sd1")
    _merged_copy_weights(reference_b, [(sd_b, -0.3)])
    for x, y in zip(only_b, outputs(reference_b)):
        assert torch.allclose(x, y, atol=1e-4, rtol=0)


def test_patch_owner_hooks_unmerged_layers_and_its_lora_output_point_scales_each_delta():
    """`use_unmerged` leaves the hooks to the patch owner: inside a batch its layers act with the
    batch's multiplier and pass the `lora_output` point (regional masks); after it, nothing."""
    from library.features.lora import NetworkLayers
    from library.sampling.patches import Batch, BatchLayout, PatchOwner

    c = fresh("sd1")
    base = outputs(c)
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=4)
    net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    net.apply_to()
    full = outputs(c)
    net.set_multiplier(0.5)
    half_strength = outputs(c)
    net.remove()
    net.set_multiplier(1.0)
    net.use_unmerged()
    assert all(torch.equal(x, y) for x, y in zip(outputs(c), base))  # no hooks of its own
    calls = []

    class Halve(NetworkLayers):
        def lora_output(self, ctx, layer, x, delta):
            calls.append(layer.name)
            return delta * 0.5

    batch = Batch((), BatchLayout(2, 1, 8, 8), None, torch.tensor([10]), torch.device("cpu"), torch.float32)
    layers = [(m, 1.0) for m in net.unmerged_layers()]
    for patch, want in ((NetworkLayers(layers), full), (Halve(layers), half_strength)):
        owner = PatchOwner(c.unet, [type("Fixed", (), {"for_batch": lambda self, b, p=patch: p})()])
        with owner.installed(batch):
            got = outputs(c)
        for x, y in zip(got, want):
            assert torch.allclose(x, y, atol=1e-5, rtol=0)
    assert not torch.allclose(full[0], base[0], atol=1e-3)
    assert len(set(calls)) == len(net.modules)
    assert all(torch.equal(x, y) for x, y in zip(outputs(c), base))  # the hooks went with the batch


def test_network_api_shape():
    c = fresh("sd1")
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4)
    net = create_network_from_weights(1.0, None, None, [c.text_encoder], c.unet, weights_sd=sd)
    assert isinstance(net, LoRANetwork)
    assert net.metadata == {}
    assert len(net.text_encoder_loras) == 18 and len(net.unet_loras) == 48
    assert net.mode == "off"
    net.apply_to()
    assert net.mode == "hooks"
    net.pre_calculation()
    assert net.mode == "precalc"
    net.restore()
    assert net.mode == "hooks"
    net.remove()
    assert net.mode == "off"


def test_bf16_model_unmerged_matches_merged():
    c = fresh("sd1")
    c.unet.to(torch.bfloat16)
    sd = random_kohya_state_dict(None, c.unet, rank=4, seed=6, conv=True)
    net = create_network_from_weights(1.0, None, None, None, c.unet, weights_sd=sd)
    latents, timesteps, context = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in unet_inputs(c))
    with torch.no_grad():
        base = c.unet(latents, timesteps, context).sample.float()
        net.apply_to()
        hooked = c.unet(latents, timesteps, context).sample.float()
        net.pre_calculation()
        merged = c.unet(latents, timesteps, context).sample.float()
        net.remove()
    assert c.unet.conv_in.weight.dtype == torch.bfloat16
    assert (hooked - base).abs().max() > 0.1
    assert (hooked - merged).abs().max() < 0.05  # bf16 rounding of the merged weights


def test_apply_to_unet_only_leaves_the_text_encoder_alone():
    c = fresh("sd1")
    base_unet, base_te = outputs(c)
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=5)
    net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    net.apply_to()
    net.apply_to(apply_text_encoder=False)
    unet_out, te_out = outputs(c)
    assert torch.equal(te_out, base_te) and no_hooks(c.text_encoder)
    assert (unet_out - base_unet).abs().max() > 0.05
    net.pre_calculation()
    before = weights(c.text_encoder)
    assert torch.equal(outputs(c)[1], base_te)
    net.remove()
    assert_same_weights(before, c.text_encoder)


def test_half_precision_merge_is_within_bf16_rounding():
    """Half-precision weights are patched in their own dtype (GEMM accumulates in fp32):
    the factors are rounded to bf16 too, so allow two bf16 steps of the summands' size."""
    toy = Toy().to(torch.bfloat16)
    w = toy.lin.weight.detach().float()
    sd = _toy_lora(rank=3, alpha=1.5)
    net = create_network_from_weights(0.9, None, None, None, toy, weights_sd=sd)
    net.pre_calculation()
    up, down = sd["lora_unet_lin.lora_up.weight"], sd["lora_unet_lin.lora_down.weight"]
    delta = 0.9 * 0.5 * up @ down
    got = toy.lin.weight.float()
    # bf16 keeps 8 significant bits of W and of each factor product term
    step = (w.abs() + 0.9 * 0.5 * up.abs() @ down.abs()) * 2**-8
    assert toy.lin.weight.dtype == torch.bfloat16
    assert bool(((got - (w + delta)).abs() <= 2 * step).all())
    assert (got - w).abs().max() > 0.1  # the delta is there
    net.restore()
    assert torch.equal(toy.lin.weight.float(), w)
