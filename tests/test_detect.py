"""Kind and config detection from shapes, on real full-size layouts (meta tensors, no weights)."""

from __future__ import annotations

import torch

from library.models.detect import detect_model, normalize_keys
from library.models.ldm_export import to_ldm_checkpoint

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_layers_per_block=1,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, norm_num_groups=32,
)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")


def _meta_checkpoint(unet_cfg: dict, te_cfg: dict, kind: str, te_layers: int) -> dict[str, tuple]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**SD_VAE)
        te = CLIPTextModel(CLIPTextConfig(**dict(te_cfg, num_hidden_layers=te_layers)))
    te_sd = te.state_dict()
    if kind != "sd1":
        te_sd["text_projection.weight"] = torch.empty(1024, 1024, device="meta")
    ckpt = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), te_sd, dict(unet.config), kind)
    return {k: tuple(v.shape) for k, v in ckpt.items()}


def _subset(actual: dict, expected: dict) -> dict:
    return {k: actual[k] for k in expected}


def test_sd15_layout_detects_the_standard_sd15_config():
    spec = detect_model(_meta_checkpoint(SD15_UNET, CLIP_L, "sd1", 12))
    assert spec.family == "sd1"
    assert _subset(spec.unet, SD15_UNET) == SD15_UNET
    assert _subset(spec.vae, SD_VAE) == SD_VAE
    assert _subset(spec.text_encoder, CLIP_L) == CLIP_L


def test_sd2_layout_detects_the_standard_sd2_config():
    # Real SD2 files hold 24 OpenCLIP blocks; the last is unused, so the model gets 23.
    spec = detect_model(_meta_checkpoint(SD2_UNET, OPENCLIP_H, "sd2", 24))
    assert spec.family == "sd2"
    assert _subset(spec.unet, SD2_UNET) == SD2_UNET
    assert _subset(spec.text_encoder, OPENCLIP_H) == OPENCLIP_H
    assert spec.text_encoder["projection_dim"] == 1024


def test_prefixless_keys_are_given_their_component_prefix():
    keys = ["input_blocks.0.0.weight", "out.2.weight", "encoder.conv_in.weight", "decoder.conv_in.weight",
            "quant_conv.weight", "transformer.embeddings.token_embedding.weight",
            "transformer.encoder.layers.0.mlp.fc1.weight", "unrelated"]
    assert normalize_keys(keys) == {
        "input_blocks.0.0.weight": "model.diffusion_model.input_blocks.0.0.weight",
        "out.2.weight": "model.diffusion_model.out.2.weight",
        "encoder.conv_in.weight": "first_stage_model.encoder.conv_in.weight",
        "decoder.conv_in.weight": "first_stage_model.decoder.conv_in.weight",
        "quant_conv.weight": "first_stage_model.quant_conv.weight",
        "transformer.embeddings.token_embedding.weight":
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "transformer.encoder.layers.0.mlp.fc1.weight":
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    }
