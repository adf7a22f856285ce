"""LoRA on SDXL: kohya's lora_te1_ / lora_te2_ / lora_unet_ names (SAI U-Net spelling and
diffusers spelling), every adapter format, exact deltas on all three networks."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from library.errors import UserError
from library.models.tiny import build_tiny_components
from networks.lora import create_network_from_weights
from networks.lora_files import random_kohya_state_dict
from networks.lora_names import TargetTable


@cache
def _tiny_sdxl():
    return build_tiny_components("sdxl", seed=0)


def _fresh():
    c = _tiny_sdxl()
    return copy.deepcopy(c.text_encoder), copy.deepcopy(c.text_encoder_2), copy.deepcopy(c.unet)


def test_sai_unet_names_resolve_to_the_sdxl_layers():
    te1, te2, unet = _fresh()
    table = TargetTable(te1, unet, te2)
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_2": "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_4_0_out_layers_3": "down_blocks.1.resnets.0.conv2",
        "lora_unet_input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
        "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
        "lora_unet_down_blocks_1_attentions_0_proj_out": "down_blocks.1.attentions.0.proj_out",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2": "text_model.encoder.layers.2.mlp.fc2",
    }
    for name, path in expected.items():
        target = table.by_kohya_name(name)
        assert target is not None, name
        assert target.path == path, name
    assert table.by_kohya_name("lora_te1_text_model_encoder_layers_0_self_attn_q_proj").module is \
        te1.get_submodule("encoder.layers.0.self_attn.q_proj")
    assert table.by_kohya_name("lora_te2_text_model_encoder_layers_0_self_attn_q_proj").module is \
        te2.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")
    assert table.by_kohya_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj") is None


def _expected_delta(sd: dict, name: str, multiplier: float) -> torch.Tensor:
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    scale = multiplier * float(sd[f"{name}.alpha"]) / down.shape[0]
    if down.ndim == 4:
        return scale * torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return scale * up @ down


def test_te1_te2_and_unet_layers_change_by_exactly_their_delta():
    te1, te2, unet = _fresh()
    sd = random_kohya_state_dict(te1, unet, rank=2, seed=3, alpha=1.0, conv=True, text_encoder_2=te2)
    prefixes = {name.split("_")[1] for name in sd}
    assert prefixes == {"te1", "te2", "unet"}
    table = TargetTable(te1, unet, te2)
    before = {t.name: t.module.weight.detach().clone() for t in table.targets}
    net = create_network_from_weights(0.8, None, None, [te1, te2], unet, weights_sd=sd)
    assert net.summary()["text_encoder"] > 0 and net.summary()["text_encoder_2"] > 0
    net.merge_to()
    names = {key.split(".")[0] for key in sd}
    for target in table.targets:
        change = target.module.weight.detach() - before[target.name]
        if target.name in names:
            assert torch.allclose(change, _expected_delta(sd, target.name, 0.8), atol=1e-6, rtol=0), target.name
        else:
            assert not change.any(), target.name
    net.restore()
    assert all(torch.equal(t.module.weight, before[t.name]) for t in table.targets)


def test_diffusers_named_sdxl_keys_and_lycoris_formats_reach_the_same_layers():
    te1, te2, unet = _fresh()
    g = torch.Generator().manual_seed(1)
    q2 = te2.get_submodule("text_model.encoder.layers.1.self_attn.q_proj")
    to_k = unet.get_submodule("down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k")
    fc1 = te1.get_submodule("encoder.layers.2.mlp.fc1")
    w = {"q2": q2.weight.detach().clone(), "to_k": to_k.weight.detach().clone(), "fc1": fc1.weight.detach().clone()}
    a, b = torch.randn(2, q2.in_features, generator=g), torch.randn(q2.out_features, 2, generator=g)
    h = [torch.randn(*shape, generator=g) for shape in ((to_k.out_features, 2), (2, to_k.in_features)) * 2]
    diff = torch.randn(fc1.weight.shape, generator=g)
    sd = {
        # PEFT / diffusers spelling of SDXL's second encoder
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight": a,
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight": b,
        # LoHa on a deep SDXL transformer block, SAI spelling
        **{f"lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.hada_{n}": t
           for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), h)},
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.alpha": torch.tensor(2.0),
        # full weight difference on the first encoder
        "lora_te1_text_model_encoder_layers_2_mlp_fc1.diff": diff,
    }
    net = create_network_from_weights(1.0, None, None, [te1, te2], unet, weights_sd=sd)
    net.merge_to()
    assert torch.allclose(q2.weight - w["q2"], b @ a, atol=1e-6, rtol=0)
    assert torch.allclose(to_k.weight - w["to_k"], (h[0] @ h[1]) * (h[2] @ h[3]), atol=1e-5, rtol=0)
    assert torch.allclose(fc1.weight - w["fc1"], diff, atol=1e-6, rtol=0)


def test_sdxl_lora_on_sd1_and_sd1_lora_on_sdxl_are_one_line_errors():
    te1, te2, unet = _fresh()
    sdxl_lora = random_kohya_state_dict(te1, unet, rank=2, seed=0, text_encoder_2=te2)
    sd1 = build_tiny_components("sd1")
    with pytest.raises(UserError, match=r"^LoRA file <state dict> is for a different base model") as info:
        create_network_from_weights(1.0, None, None, sd1.text_encoder, sd1.unet, weights_sd=sdxl_lora)
    assert "\n" not in str(info.value)
    sd1_lora = random_kohya_state_dict(sd1.text_encoder, sd1.unet, rank=2, seed=0)
    with pytest.raises(UserError, match=r"^LoRA file <state dict> is for a different base model") as info:
        create_network_from_weights(1.0, None, None, [te1, te2], unet, weights_sd=sd1_lora)
    assert "\n" not in str(info.value)
