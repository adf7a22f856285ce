"""Writing small kohya-format LoRA files with random factors, for tests and tools.

The factors are random (not zero like a freshly initialised kohya LoRA) so every layer's
delta is visible in equality tests; magnitudes are chosen so the delta is about a tenth of
a typical weight of the tiny models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from networks.lora_names import default_targets

logger = logging.getLogger(__name__)


def random_kohya_state_dict(
    text_encoder: nn.Module | None,
    unet: nn.Module | None,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    conv: bool = False,
    dtype: torch.dtype = torch.float32,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Kohya keys with random ``lora_down`` / ``lora_up`` for every default target (SDXL:
    with `text_encoder_2`, ``lora_te1_`` / ``lora_te2_`` keys for the two encoders).

    Conv layers get a k x k ``lora_down`` and a 1x1 ``lora_up`` (LoCon). `alpha` None writes
    no alpha keys (the loader then uses alpha = rank).
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for target in sorted(default_targets(text_encoder, unet, conv, text_encoder_2), key=lambda t: t.name):
        shape = target.weight_shape
        r = min(rank, shape[0], shape[1])
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        down = torch.randn(r, *shape[1:], generator=generator) / fan_in**0.5
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=generator)
        up *= 0.1 / r**0.5  # so a delta element is ~0.1 / sqrt(fan_in), a tenth of a weight
        state[f"{target.name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{target.name}.lora_up.weight"] = up.to(dtype).contiguous()
        if alpha is not None:
            state[f"{target.name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return state


def write_kohya_lora(
    path: str | Path,
    text_encoder: nn.Module | None,
    unet: nn.Module | None,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    conv: bool = False,
    dtype: torch.dtype = torch.float32,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Write a kohya-format ``.safetensors`` LoRA for the given models; return its tensors.

    Covers every kohya default target (U-Net transformer blocks, text-encoder attention and
    MLP; with `conv` also the resnet / down / upsample convs). Metadata carries the usual
    ``ss_network_*`` fields so ``--network_show_meta`` has something to show.
    """
    state = random_kohya_state_dict(text_encoder, unet, rank, seed, alpha, conv, dtype, text_encoder_2)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha if alpha is not None else rank),
        "ss_network_args": json.dumps({"conv_dim": rank, "conv_alpha": alpha or rank} if conv else {}),
        "ss_comment": f"random test LoRA (seed {seed})",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    logger.info("wrote %s: %d tensors", path, len(state))
    return state
