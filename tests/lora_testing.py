"""Helpers shared by the LoRA tests: fresh tiny models, fixed inputs, output snapshots."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import Tensor, nn

from library.models.tiny import TinyComponents, build_tiny_components


@lru_cache(maxsize=None)
def _cached(kind: str) -> TinyComponents:
    return build_tiny_components(kind, seed=0)


def fresh(kind: str = "sd1") -> TinyComponents:
    """A private copy of the tiny models (tests patch them)."""
    c = _cached(kind)
    return type(c)(c.kind, copy.deepcopy(c.text_encoder), copy.deepcopy(c.unet), c.vae)


def unet_inputs(c: TinyComponents, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = c.unet.config.cross_attention_dim
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 77, width, generator=g)
    return latents, timesteps, context


def token_ids(seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49406, (2, 77), generator=g)


@torch.no_grad()
def outputs(c: TinyComponents) -> tuple[Tensor, Tensor]:
    """(U-Net output, text-encoder last hidden state) on fixed inputs."""
    unet_out = c.unet(*unet_inputs(c)).sample
    te_out = c.text_encoder(token_ids()).last_hidden_state
    return unet_out, te_out


def weights(*models: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter, to compare with torch.equal later."""
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def assert_same_weights(before: dict[str, Tensor], *models: nn.Module) -> None:
    after = weights(*models)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks for model in models for m in model.modules())
