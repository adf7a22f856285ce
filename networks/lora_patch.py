"""Reversible weight patches shared by every network that merges into the same layer.

Merging (``--network_merge``) and pre-calculation (``--network_pre_calc``) both write
``W' = f_n(...f_1(W))`` into a layer's weight, where each ``f`` is one network's patch
(for LoRA ``W + m ΔW``). Several networks may patch one layer, in any order, and take their
patch back in any order; so the first patch backs the original weight up, every change
recomputes the weight from that backup and the remaining patches (in fp32), and dropping the
last patch copies the backup back, which restores the weight bit for bit.

The registry is keyed weakly by module: it holds no reference that would keep a model alive,
and nothing is stored on the model objects themselves.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: ``patch(source, out) -> result``: weight `source` with the patch applied, written into `out`
#: (which may be `source`) where possible; returns `out` or a new tensor. fp32 unless additive.
Patch = Callable[[Tensor, Tensor], Tensor]


class WeightPatches:
    """The original weight of one layer and the ordered patches applied on top of it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.backup: Tensor = module.weight.detach().clone()
        self.patches: dict[Hashable, Patch] = {}
        self.additive: dict[Hashable, bool] = {}

    @torch.no_grad()
    def recompute(self) -> None:
        module = self.module()
        if module is None:
            return
        weight = module.weight
        if not self.patches:
            weight.copy_(self.backup)
            return
        if weight.dtype == torch.float32 or all(self.additive.values()):
            # straight into the weight, no layer-sized temporaries: additive patches on
            # half-precision weights add in fp32 inside the GEMM / add and round once
            value, out = self.backup.to(weight.device), weight
        else:  # DoRA on half-precision weights: one fp32 copy, patched, rounded once
            value = out = self.backup.to(weight.device, torch.float32, copy=True)
        for patch in self.patches.values():
            value = patch(value, out)
        if value is not weight:
            weight.copy_(value)


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, WeightPatches] = weakref.WeakKeyDictionary()


def set_patch(module: nn.Module, owner: Hashable, patch: Patch, additive: bool = False) -> None:
    """Add or replace `owner`'s patch on `module` and rewrite the weight.

    `additive` patches (``W + something``) may receive and write weights of the layer's own
    dtype; others always get fp32.
    """
    state = _REGISTRY.get(module)
    if state is None:
        state = _REGISTRY[module] = WeightPatches(module)
    state.patches[owner] = patch
    state.additive[owner] = additive
    state.recompute()


def drop_patch(module: nn.Module, owner: Hashable) -> None:
    """Remove `owner`'s patch; the last one out restores the original weight exactly."""
    state = _REGISTRY.get(module)
    if state is None or owner not in state.patches:
        return
    del state.patches[owner]
    del state.additive[owner]
    state.recompute()
    if not state.patches:
        del _REGISTRY[module]


def refresh(module: nn.Module) -> None:
    """Recompute `module`'s weight from its backup (after a patch's parameters changed)."""
    state = _REGISTRY.get(module)
    if state is not None:
        state.recompute()
