"""Tests for `library.models.ldm_export`: Diffusers state dicts -> LDM single-file layout.

The layouts are checked by round-tripping: export with our functions, convert back with
diffusers' own LDM -> Diffusers converters, and demand the very same tensors under the very
same keys. The SD 1.5 U-Net key names are also checked directly, on a meta-device model.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from library.errors import UserError
from library.models.ldm_export import (
    clip_to_ldm,
    open_clip_to_ldm,
    to_ldm_checkpoint,
    unet_to_ldm,
    vae_to_ldm,
)
from library.models.tiny import KINDS, build_tiny_components

PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@pytest.fixture(scope="module", params=[kind for kind in KINDS if kind != "sdxl"])  # SDXL: test_sdxl_models.py
def tiny(request):
    return build_tiny_components(request.param, seed=3)


def assert_same_state(actual: dict, expected: dict) -> None:
    """Same key set and bit-identical tensors (dtype and shape included)."""
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def hf_text_keys(sd: dict) -> dict:
    """Diffusers' converters return `text_model.`-prefixed keys; flattened models lack it."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def test_full_checkpoint_round_trips_through_diffusers(tiny):
    unet_sd, vae_sd, te_sd = tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict()
    ckpt = to_ldm_checkpoint(unet_sd, vae_sd, te_sd, tiny.unet.config, tiny.kind)

    assert all(k.startswith(PREFIXES) for k in ckpt if k != "v_pred")
    assert_same_state(convert_ldm_unet_checkpoint(ckpt, dict(tiny.unet.config)), unet_sd)
    assert_same_state(convert_ldm_vae_checkpoint(ckpt, dict(tiny.vae.config)), vae_sd)
    if tiny.kind == "sd1":
        text = convert_ldm_clip_checkpoint(ckpt)
    else:
        text = convert_open_clip_checkpoint(tiny.text_encoder, ckpt)
    assert_same_state(hf_text_keys(text), te_sd)

    te_keys = [k for k in ckpt if k.startswith("cond_stage_model.")]
    unet_keys = [k for k in ckpt if k.startswith("model.diffusion_model.")]
    vae_keys = [k for k in ckpt if k.startswith("first_stage_model.")]
    assert (len(unet_keys), len(vae_keys)) == (len(unet_sd), len(vae_sd))
    if tiny.kind == "sd1":
        # HF keys kept one to one, with the `text_model.` wrapper the files always have.
        assert len(te_keys) == len(te_sd) == 52
        assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in te_keys)
    else:
        # 3 layers x (4 q/k/v weights+biases fused into 2) + text_projection + logit_scale.
        assert len(te_keys) == 52 - 3 * 4 + 2
        assert all(k.startswith("cond_stage_model.model.") for k in te_keys)
    if tiny.kind == "sd2-v":
        assert ckpt["v_pred"].ndim == 0 and ckpt["v_pred"].item() == 1
        assert len(ckpt) == len(unet_sd) + len(vae_sd) + len(te_keys) + 1
    else:
        assert "v_pred" not in ckpt
        assert len(ckpt) == len(unet_sd) + len(vae_sd) + len(te_keys)


def test_exported_tensors_alias_the_inputs(tiny):
    """Renaming copies nothing: safetensors can save the result, memory is not doubled."""
    unet_sd = tiny.unet.state_dict()
    ldm = unet_to_ldm(unet_sd, tiny.unet.config)
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"] is unet_sd["conv_in.weight"]
    assert ldm["model.diffusion_model.out.2.bias"] is unet_sd["conv_out.bias"]


def test_vae_layout_details():
    vae = build_tiny_components("sd1").vae
    sd = vae.state_dict()
    ldm = vae_to_ldm(sd)
    # Decoder up blocks are numbered in reverse: Diffusers' first is LDM's last (of 4).
    p = "first_stage_model."
    assert ldm[p + "decoder.up.3.block.0.conv1.weight"] is sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    assert ldm[p + "decoder.up.1.upsample.conv.bias"] is sd["decoder.up_blocks.2.upsamplers.0.conv.bias"]
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm  # last up block: no upsampler
    assert "first_stage_model.encoder.down.3.downsample.conv.weight" not in ldm
    assert ldm["first_stage_model.encoder.norm_out.weight"] is sd["encoder.conv_norm_out.weight"]
    # Mid attention: Linear weights stored as 1x1 convolutions; biases and norm unchanged.
    for name in ("q", "k", "v", "proj_out"):
        assert ldm[f"first_stage_model.decoder.mid.attn_1.{name}.weight"].shape == (32, 32, 1, 1)
        assert ldm[f"first_stage_model.encoder.mid.attn_1.{name}.bias"].shape == (32,)
    assert torch.equal(
        ldm["first_stage_model.encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
        sd["encoder.mid_block.attentions.0.to_out.0.weight"],
    )
    assert ldm[p + "decoder.mid.attn_1.norm.bias"] is sd["decoder.mid_block.attentions.0.group_norm.bias"]
    assert "first_stage_model.decoder.mid.block_2.norm1.weight" in ldm
    assert sorted(k for k in ldm if "quant_conv" in k) == [
        "first_stage_model.post_quant_conv.bias",
        "first_stage_model.post_quant_conv.weight",
        "first_stage_model.quant_conv.bias",
        "first_stage_model.quant_conv.weight",
    ]


def test_vae_shortcut_is_nin_shortcut():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=32)
    sd = vae.state_dict()
    ldm = vae_to_ldm(sd)
    assert ldm["first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert "first_stage_model.decoder.up.1.block.2.conv2.weight" in ldm  # up blocks: layers + 1
    assert_same_state(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), sd)


@pytest.mark.parametrize(
    ("down", "up", "layers"),
    [
        # Three levels, two layers, attention everywhere but the deepest level.
        (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), 2),
        # Attention only in the deepest level: the upsampler then sits at `.2.conv` first.
        (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"), 3),
    ],
)
def test_unet_of_other_sizes_round_trips(down, up, layers):
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32,) * (len(down) - 1) + (64,), layers_per_block=layers,
        down_block_types=down, up_block_types=up, cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=32,
    )
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, unet.config)
    assert_same_state(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), sd)
    levels = len(down)
    last_input = levels * layers + (levels - 1)  # resnets plus downsamplers after input_blocks.0
    last_output = levels * (layers + 1) - 1
    assert f"model.diffusion_model.input_blocks.{last_input}.0.in_layers.0.weight" in ldm
    assert not any(f"input_blocks.{last_input + 1}." in k for k in ldm)
    assert f"model.diffusion_model.output_blocks.{last_output}.0.out_layers.3.weight" in ldm
    slot = 2 if "Attn" in up[0] else 1
    first_upsampler = f"model.diffusion_model.output_blocks.{layers}.{slot}.conv.weight"
    assert ldm[first_upsampler] is sd["up_blocks.0.upsamplers.0.conv.weight"]


def sd15_unet_on_meta() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )


def test_sd15_unet_key_layout():
    unet = sd15_unet_on_meta()
    ldm = unet_to_ldm(unet.state_dict(), dict(unet.config))
    assert len(ldm) == 686
    p = "model.diffusion_model."
    expected_shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.9.0.op.bias": (1280,),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "middle_block.2.out_layers.0.bias": (1280,),
        "output_blocks.0.0.in_layers.0.weight": (2560,),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(ldm[p + key].shape) == shape, key
    blocks = {".".join(k.split(".")[2:4]) for k in ldm if ".input_blocks." in k or ".output_blocks." in k}
    assert sorted(blocks) == sorted([f"{name}_blocks.{i}" for name in ("input", "output") for i in range(12)])
    # No upsampler in the last up block (the deepest down block's lack of one shows above).
    assert not any(k.startswith(p + "output_blocks.11.2.") for k in ldm)
    assert sum(".conv.weight" in k for k in ldm) == 3 and sum(".op.weight" in k for k in ldm) == 3


def test_sd2_text_projection_and_logit_scale():
    te = build_tiny_components("sd2").text_encoder
    sd = te.state_dict()
    p = "cond_stage_model.model."
    ldm = open_clip_to_ldm(sd)
    assert torch.equal(ldm[p + "text_projection"], torch.eye(64))  # default: identity [width, width]
    assert ldm[p + "logit_scale"].shape == ()
    assert torch.equal(ldm[p + "logit_scale"], torch.tensor(math.log(100.0)))
    assert ldm[p + "positional_embedding"] is sd["embeddings.position_embedding.weight"]
    fused = ldm[p + "transformer.resblocks.2.attn.in_proj_weight"]
    assert fused.shape == (192, 64)
    assert torch.equal(fused[64:128], sd["encoder.layers.2.self_attn.k_proj.weight"])
    fused_bias = ldm[p + "transformer.resblocks.0.attn.in_proj_bias"]
    assert torch.equal(fused_bias[128:], sd["encoder.layers.0.self_attn.v_proj.bias"])
    assert ldm[p + "transformer.resblocks.1.mlp.c_proj.weight"] is sd["encoder.layers.1.mlp.fc2.weight"]
    assert ldm[p + "ln_final.bias"] is sd["final_layer_norm.bias"]
    assert not any("resblocks.3." in k for k in ldm)  # exactly the layers given

    # A Linear projection [proj_dim, width] is stored transposed; its first dim stays the width.
    projection = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    explicit = open_clip_to_ldm(sd, projection=projection)
    assert explicit[p + "text_projection"].shape == (64, 32)
    assert torch.equal(explicit[p + "text_projection"], projection.T)
    assert_same_state(hf_text_keys(convert_open_clip_checkpoint(te, explicit)), sd)
    # A CLIPTextModelWithProjection-style state dict brings its own projection.
    wrapped = {"text_model." + k: v for k, v in sd.items()} | {"text_projection.weight": projection}
    assert torch.equal(open_clip_to_ldm(wrapped)[p + "text_projection"], projection.T)


def test_sd1_text_keys_keep_hf_names():
    te_sd = build_tiny_components("sd1").text_encoder.state_dict()
    ldm = clip_to_ldm(te_sd)
    p = "cond_stage_model.transformer.text_model."
    q_proj = "encoder.layers.2.self_attn.q_proj.weight"
    assert ldm[p + q_proj] is te_sd[q_proj]
    assert ldm[p + "embeddings.token_embedding.weight"].shape == (49408, 32)
    # Wrapped keys are not wrapped twice, and a projection (no place in SD1 files) is dropped.
    wrapped = {"text_model." + k: v for k, v in te_sd.items()}
    wrapped["text_projection.weight"] = torch.ones(32, 32)
    assert sorted(clip_to_ldm(wrapped)) == sorted(ldm)


def test_unexpected_weights_are_refused():
    c = build_tiny_components("sd2")
    with pytest.raises(UserError, match="U-Net.*1 unexpected weight.*add_embedding.linear_3.weight"):
        unet_to_ldm(c.unet.state_dict() | {"add_embedding.linear_3.weight": torch.zeros(1)}, c.unet.config)
    with pytest.raises(UserError, match="VAE.*encoder.down_blocks.0.attentions.0.to_q.weight"):
        vae_to_ldm(c.vae.state_dict() | {"encoder.down_blocks.0.attentions.0.to_q.weight": torch.zeros(1)})
    te_sd = dict(c.text_encoder.state_dict())
    del te_sd["encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(UserError, match="incomplete.*layers.1.self_attn.q_proj.bias"):
        open_clip_to_ldm(te_sd)
    with pytest.raises(ValueError, match="unknown checkpoint kind 'sd3'"):
        to_ldm_checkpoint({}, {}, {}, c.unet.config, "sd3")
    with pytest.raises(ValueError, match="an SDXL checkpoint needs the second text encoder's state dict"):
        to_ldm_checkpoint({}, {}, {}, c.unet.config, "sdxl")
