"""Kind and config detection from shapes, on real full-size layouts (meta tensors, no weights)."""

from __future__ import annotations

import torch

from library.models.detect import detect_model, normalize_keys
from library.models.ldm_export import to_ldm_checkpoint
from tests.helpers import CLIP_L, OPENCLIP_H, SD15_UNET, SD2_UNET, SD_VAE

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
