"""The full-size SD 1.5-shaped checkpoint with fixed random weights that the benchmarks use.

`full_size_checkpoint(cache_dir)` writes it once (fp16, ~2.13 GB, LDM single-file layout via
`library.models.ldm_export`) and returns its path; see docs/performance.md.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from library.models.ldm_export import to_ldm_checkpoint

logger = logging.getLogger("benchmark")

CHECKPOINT_NAME = "sd15-shaped-random-v1-fp16.safetensors"

# SD 1.5 shapes: U-Net 320/640/1280/1280, VAE 128/256/512/512, CLIP ViT-L/14 text encoder.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


# --- the full-size checkpoint ---------------------------------------------------------------


def full_size_checkpoint(cache_dir: Path) -> Path:
    """The SD 1.5-shaped random checkpoint in `cache_dir`, written on first use (~2 GB fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    path = cache_dir.expanduser() / CHECKPOINT_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing the full-size random checkpoint %s (once)", path)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    generator = torch.Generator().manual_seed(0)
    tensors = to_ldm_checkpoint(
        _random_weights(unet, generator), _random_weights(vae, generator),
        _random_weights(text_encoder, generator), dict(unet.config), "sd1",
    )
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def _random_weights(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp16 weights for a meta-device module: norm scales near 1, small biases, matrices and
    convolutions scaled by 1/sqrt(fan-in) so activations stay finite through the network."""
    out = {}
    for name, meta in module.state_dict().items():
        if not meta.is_floating_point():
            continue  # position-id buffers: the loader makes its own
        value = torch.randn(meta.shape, generator=generator)
        if meta.ndim == 1:
            value = 1.0 + 0.1 * value if name.endswith("weight") else 0.02 * value
        else:
            value /= math.sqrt(meta[0].numel())
        out[name] = value.to(torch.float16)
    return out
