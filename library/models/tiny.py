"""Tiny Stable Diffusion components with fixed random weights, for tests and the demo.

The networks have the real SD 1.x / 2.x / XL *structure* (same block types, same key layout,
8x VAE downsampling, 77-token CLIP text encoder with the full 49,408-token vocabulary) but
tiny widths, so a whole model builds in about a second on a CPU and goes through exactly the
same loading code as a 2 GB checkpoint.

Widths follow the rules that `library.models.detect` uses for what weights cannot tell
(attention head counts): SD1 U-Nets have 8 heads per attention layer, SD2 U-Nets and all
text encoders have 64-wide heads (at least one head).

The tiny SDXL has SDXL's structure in miniature: a CLIP ViT-L-like text encoder (quick_gelu)
and a bigG-like `CLIPTextModelWithProjection` (gelu, a projection narrower than its width,
so a transposed projection cannot go unnoticed); a U-Net of three levels with two resnets
each (nine input blocks, as SDXL's), level 0 without attention, the deeper levels with
transformer depths 1 and 2, linear projections, cross-attention over the two encoders'
widths concatenated, and the `text_time` added conditioning (pooled vector + six sinusoids
of 8 numbers each); the VAE with SDXL's scaling factor 0.13025.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["sd1", "sd2", "sd2-v", "sdxl"]
KINDS: tuple[Kind, ...] = ("sd1", "sd2", "sd2-v", "sdxl")
#: Tiny SDXL: sinusoid width per added size number (256 on real SDXL).
SDXL_TIME_EMBED_DIM = 8


@dataclass(frozen=True)
class TinyComponents:
    """The networks of a tiny model; `kind` says which family it imitates
    (`text_encoder_2`, the bigG-like encoder, is SDXL's only)."""

    kind: Kind
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder_2: torch.nn.Module | None = None


def text_encoder_config(kind: Kind) -> dict:
    """CLIPTextConfig kwargs: SD1 and SDXL's first encoder imitate CLIP ViT-L (quick_gelu),
    SD2 OpenCLIP ViT-H (gelu)."""
    sd2 = kind not in ("sd1", "sdxl")
    return dict(
        vocab_size=49408,
        hidden_size=64 if sd2 else 32,
        intermediate_size=128 if sd2 else 64,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=64 if sd2 else 32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def text_encoder_2_config() -> dict:
    """CLIPTextConfig kwargs of the tiny SDXL's bigG-like encoder: gelu, projection 48 of width 64."""
    return dict(text_encoder_config("sd2"), projection_dim=48)


def unet_config(kind: Kind) -> dict:
    """UNet2DConditionModel kwargs in SD layout: attention in all but the deepest block
    (SDXL: in all but the first, see the module docstring)."""
    if kind == "sdxl":
        return sdxl_unet_config()
    sd2 = kind != "sd1"
    channels = (64, 128) if sd2 else (32, 64)
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=text_encoder_config(kind)["hidden_size"],
        # SD2: 64-wide heads ("attention_head_dim" holds head *counts* in diffusers' SD configs);
        # SD1: 8 heads everywhere.
        attention_head_dim=tuple(max(1, c // 64) for c in channels) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )


def sdxl_unet_config() -> dict:
    """The tiny SDXL U-Net: 3 levels x 2 resnets, attention (depth 1, 2) below level 0."""
    channels = (32, 64, 64)
    pooled = text_encoder_2_config()["projection_dim"]
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=text_encoder_config("sdxl")["hidden_size"] + text_encoder_2_config()["hidden_size"],
        attention_head_dim=tuple(max(1, c // 64) for c in channels),
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=pooled + 6 * SDXL_TIME_EMBED_DIM,
    )


def demo_unet_config() -> dict:
    """The demo model's U-Net (SD1 layout): three levels of 32, 32 and 64 channels with attention
    only at the deepest (and in the middle block), 4x smaller on each side than the latent.

    The demo runs at the default 512x512 (a 64x64 latent). The tiny test U-Net attends at full
    latent size, 4096 tokens in 8 heads of 4 channels, which made the first image of a new user
    take 1.9 s per step on 2 cores; at 256 tokens the attention costs little and the
    convolutions are what remains. Everything else is the tiny SD1 model's.
    """
    return dict(
        unet_config("sd1"),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
    )


def vae_config(kind: Kind = "sd1") -> dict:
    """AutoencoderKL kwargs: four blocks (8x downsampling) of 32 channels, SD's (or SDXL's) scaling."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    )


def build_tiny_components(kind: Kind, seed: int = 0, unet: dict | None = None) -> TinyComponents:
    """Build the tiny networks of `kind` with weights drawn from `seed` (fp32, eval mode);
    `unet`: other U-Net kwargs than `unet_config(kind)` (the demo model's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(kind)))
        unet = UNet2DConditionModel(**(unet or unet_config(kind)))
        vae = AutoencoderKL(**vae_config(kind))
        text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2_config()))
                          if kind == "sdxl" else None)
        modules = [m for m in (text_encoder, unet, vae, text_encoder_2) if m is not None]
        # Default inits leave some layers (zero-initialised outputs) inert; give every
        # parameter a small random value so every weight matters in equality tests.
        for module in modules:
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name.endswith("weight") and param.ndim == 1:  # norms: near 1
                        param.copy_(1.0 + 0.1 * torch.randn_like(param))
                    elif param.ndim == 1:
                        param.copy_(0.02 * torch.randn_like(param))
                    else:
                        fan_in = param[0].numel()
                        param.copy_(torch.randn_like(param) / fan_in**0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    for module in modules:
        module.eval().requires_grad_(False)
    return TinyComponents(kind, text_encoder, unet, vae, text_encoder_2)


#: Hint-encoder widths of the tiny ControlNets: four widths, so three stride-2 convs take
#: the image to latent size (8x smaller), as in real ControlNets (16, 32, 96, 256).
TINY_HINT_CHANNELS = (8, 8, 16, 16)


def tiny_controlnet(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A diffusers `ControlNetModel` copied from `unet`, every weight moved by seeded noise.

    Real ControlNets start with zero convolutions (no effect) and learn; ours get random
    ones, N(0, 0.05), so a test can see the ControlNet change an image. The weights copied
    from the U-Net are moved too (a few percent of their size), so a difference file
    relative to that U-Net is not mostly zeros.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_CHANNELS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if not param.any():  # zero convs (and the hint encoder's zero-initialised output conv)
                param.copy_(0.05 * noise)
            elif param.ndim == 1:
                param.add_(0.02 * noise)
            else:
                param.add_(0.2 * noise / param[0].numel() ** 0.5)
    return controlnet.eval().requires_grad_(False)
