"""LoRA file layouts: kohya vs diffusers' own loader (oracle), LDM names, diffusers/PEFT keys,
.ckpt files, metadata."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from library.models.ldm_export import unet_to_ldm
from networks.lora import create_network_from_weights
from networks.lora_files import random_kohya_state_dict, write_kohya_lora
from networks.lora_names import TargetTable, is_patchable, kohya_name
from tests.helpers import fresh, outputs


def _tokenizer():
    from library.models.tokenizer import load_tokenizer

    return load_tokenizer("sd1")


@pytest.mark.parametrize("conv", [False, True])
def test_merge_matches_diffusers_load_lora_weights_and_fuse(tmp_path, conv):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    ours, theirs = fresh("sd1"), fresh("sd1")
    path = tmp_path / "kohya.safetensors"
    write_kohya_lora(path, ours.text_encoder, ours.unet, rank=4, seed=7, alpha=2.0, conv=conv)
    pipe = StableDiffusionPipeline(
        vae=theirs.vae,
        text_encoder=theirs.text_encoder,
        tokenizer=_tokenizer(),
        unet=theirs.unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    base = outputs(theirs)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    want = outputs(theirs)

    net = create_network_from_weights(1.0, path, None, ours.text_encoder, ours.unet)
    net.merge_to()
    merged = outputs(ours)
    net.restore()
    net.apply_to()
    hooked = outputs(ours)
    for got in (merged, hooked):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-4, rtol=0)
    for a, b in zip(want, base):  # the oracle did apply the LoRA to U-Net and text encoder
        assert (a - b).abs().max() > 0.05


def _ldm_rename(sd: dict, unet) -> dict:
    """kohya diffusers-style names -> LDM names, using the project's checkpoint exporter."""
    paths = [p for p, m in unet.named_modules() if is_patchable(m)]
    exported = unet_to_ldm({f"{p}.weight": torch.empty(0) for p in paths}, unet.config)
    ldm_paths = [k[len("model.diffusion_model.") : -len(".weight")] for k in exported]
    names = {kohya_name("unet", p): kohya_name("unet", q) for p, q in zip(paths, ldm_paths)}
    out = {}
    for key, value in sd.items():
        name, rest = key.split(".", 1)
        out[f"{names.get(name, name)}.{rest}"] = value
    return out


def test_ldm_names_resolve_like_the_checkpoint_exporter():
    for kind in ("sd1", "sd2"):
        c = fresh(kind)
        table = TargetTable(c.text_encoder, c.unet)
        paths = [p for p, m in c.unet.named_modules() if is_patchable(m)]
        exported = unet_to_ldm({f"{p}.weight": torch.empty(0) for p in paths}, c.unet.config)
        assert len(exported) == len(paths) == 83
        for path, key in zip(paths, exported):
            ldm = key[len("model.diffusion_model.") : -len(".weight")]
            assert table.by_kohya_name(kohya_name("unet", ldm)).path == path


def test_ldm_names_of_a_full_size_sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64,
        )
    table = TargetTable(None, unet)
    known = {  # SD 1.5 single-file names -> diffusers module paths
        "lora_unet_input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "lora_unet_input_blocks_11_0_emb_layers_1": "down_blocks.3.resnets.1.time_emb_proj",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "lora_unet_output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "lora_unet_output_blocks_8_1_transformer_blocks_0_ff_net_2": "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2",
        "lora_unet_output_blocks_11_0_out_layers_3": "up_blocks.3.resnets.2.conv2",
        "lora_unet_time_embed_2": "time_embedding.linear_2",
        "lora_unet_out_2": "conv_out",
        "lora_unet_input_blocks_0_0": "conv_in",
    }
    for name, path in known.items():
        assert table.by_kohya_name(name).path == path
    assert len(table.targets) == 282


def test_ldm_named_file_merges_like_the_diffusers_named_file():
    c = fresh("sd1")
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=8, alpha=1.0, conv=True)
    ldm = _ldm_rename(sd, c.unet)
    assert "lora_unet_output_blocks_1_1_conv.lora_down.weight" in ldm  # upsampler, no attention
    assert "lora_unet_output_blocks_3_1_proj_out.lora_up.weight" in ldm
    a = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    b = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=ldm)
    assert [m.module for m in a.modules] == [m.module for m in b.modules]
    for x, y in zip(a.modules, b.modules):
        assert torch.equal(x.delta_weight(), y.delta_weight())


def _peft_layout(sd: dict, table: TargetTable, style: str) -> dict:
    """Rewrite kohya keys in a diffusers / PEFT spelling."""
    out = {}
    for key, value in sd.items():
        name, param = key.split(".", 1)
        target = table.by_kohya_name(name)
        prefix = "unet." if target.component == "unet" else "text_encoder.text_model."
        path = prefix + target.path
        if param == "alpha":
            out[f"{path}.alpha"] = value
            continue
        which = "down" if param.startswith("lora_down") else "up"
        if style == "peft":
            out[f"{path}.lora_{'A' if which == 'down' else 'B'}.weight"] = value
        elif style == "peft-named":
            out[f"{path}.lora_{'A' if which == 'down' else 'B'}.default_0.weight"] = value
        elif style == "diffusers-old":
            out[f"{path}.lora.{which}.weight"] = value
        else:
            raise AssertionError(style)
    return out


@pytest.mark.parametrize("style", ["peft", "peft-named", "diffusers-old"])
def test_diffusers_and_peft_layouts_merge_like_kohya(style):
    c = fresh("sd1")
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=9, alpha=2.0, conv=True)
    table = TargetTable(c.text_encoder, c.unet)
    converted = _peft_layout(sd, table, style)
    a = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    b = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=converted)
    assert len(b.modules) == len(a.modules) == 97
    deltas = {m.target.name: m.delta_weight() for m in a.modules}
    for m in b.modules:
        assert torch.equal(m.delta_weight(), deltas[m.target.name])


def test_diffusers_attention_processor_layout():
    c = fresh("sd1")
    g = torch.Generator().manual_seed(0)
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    sd = {
        f"unet.{prefix}.processor.to_out_lora.down.weight": down,
        f"unet.{prefix}.processor.to_out_lora.up.weight": up,
    }
    net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    assert [m.target.path for m in net.modules] == [f"{prefix}.to_out.0"]
    assert torch.allclose(net.modules[0].delta_weight(), up @ down, atol=1e-6)


def test_ckpt_file_loads_like_safetensors_and_metadata_is_kept(tmp_path):
    c = fresh("sd1")
    st = tmp_path / "lora.safetensors"
    sd = write_kohya_lora(st, c.text_encoder, c.unet, rank=4, seed=12, alpha=3.0)
    pt = tmp_path / "lora.pt"
    torch.save(sd, pt)
    a = create_network_from_weights(1.0, st, None, c.text_encoder, c.unet)
    b = create_network_from_weights(1.0, pt, None, c.text_encoder, c.unet)
    assert a.metadata["ss_network_dim"] == "4"
    assert a.metadata["ss_network_alpha"] == "3.0"
    assert a.metadata["ss_network_module"] == "networks.lora"
    assert b.metadata == {}
    for x, y in zip(a.modules, b.modules):
        assert x.module is y.module
        assert torch.equal(x.delta_weight(), y.delta_weight())


def test_unknown_keys_are_counted_in_one_warning(caplog):
    c = fresh("sd1")
    sd = random_kohya_state_dict(c.text_encoder, c.unet, rank=2, seed=1)
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    sd["something_else"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        net = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "LoRA file <state dict>: ignored 3 keys that match no layer of this model "
        "(e.g. lora_unet_no_such_layer.lora_down.weight)"
    ]
    assert len(net.modules) == 66


def test_fp16_file_is_applied_in_fp32_like_its_values(tmp_path):
    c = fresh("sd1")
    sd16 = random_kohya_state_dict(c.text_encoder, c.unet, rank=4, seed=3, dtype=torch.float16)
    sd32 = {k: v.float() for k, v in sd16.items()}
    path = tmp_path / "half.safetensors"
    save_file(sd16, str(path))
    a = create_network_from_weights(1.0, path, None, c.text_encoder, c.unet)
    b = create_network_from_weights(1.0, None, None, c.text_encoder, c.unet, weights_sd=sd32)
    for x, y in zip(a.modules, b.modules):
        assert torch.equal(x.delta_weight(), y.delta_weight())
