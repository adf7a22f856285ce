"""LoRA-family networks for `--network_module networks.lora`, written for this project.

Semantics follow kohya's LoRA: a target layer's output becomes

    y = layer(x) + multiplier * (alpha / rank) * up(down(x))

(rank = ``down``'s output size, missing alpha = rank), and LyCORIS LoHa / LoKr / full-diff
and DoRA files work the same way through their weight deltas (`networks.lora_adapters`).
File layouts (kohya, LDM names, diffusers, PEFT) are read by `networks.lora_formats`.

A `LoRANetwork` can be used in three ways, which can be switched between at any time:

* ``apply_to()``: un-merged. A forward hook on each target layer adds the adapter's output;
  weights are untouched and ``remove()`` detaches everything (kohya's API, for scripts).
* ``use_unmerged()``: un-merged without hooks of its own: `gen_img` hands ``unmerged_layers()``
  to the patch owner (`library.sampling.patches`), which hooks them for each batch with the
  batch's multiplier (``--am``) and its ``lora_output`` point (regional masks), and removes
  the hooks after the batch.
* ``merge_to()``: the deltas are written into the weights (``--network_merge``), so
  generation runs at the speed of the bare model; ``restore()`` brings the exact original
  weights back.
* ``pre_calculation()``: like a merge, but meant to follow multiplier changes
  (``--network_pre_calc`` with ``--am``): ``set_multiplier`` rewrites the weights at once and
  ``restore()`` returns to the un-merged hooks if ``apply_to`` was called.

Several networks compose: hooks add up independently, weight patches are stacked per layer
by `networks.lora_patch` and can be taken back in any order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from library.errors import UserError
from networks import lora_patch
from networks.lora_adapters import Adapter
from networks.lora_formats import LayerMismatch, parse_state_dict
from networks.lora_io import read_lora_file
from networks.lora_names import Target, TargetTable

logger = logging.getLogger(__name__)

#: ``modulate(lora_module, x, lora_output) -> tensor``: changes a LoRA delta before it is added.
OutputModulator = Callable[["LoRAModule", Tensor, Tensor], Tensor]


class LoRAModule:
    """One network's adapter on one target layer: hook, weight patch and multiplier."""

    def __init__(self, network: LoRANetwork, target: Target, adapter: Adapter) -> None:
        self.network = network
        self.target = target
        self.adapter = adapter
        self.enabled = True
        self._handle: RemovableHandle | None = None

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def module(self) -> nn.Module:
        return self.target.module

    # -- un-merged ---------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handle is None:
            with torch.no_grad():
                self.adapter.prepare(self.module)
            self._handle = self.module.register_forward_hook(self._forward_hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["input"]
        return self.add_output(module, x, output, self.network.multiplier)

    def add_output(self, module: nn.Module, x: Tensor, output: Tensor, multiplier: float,
                   modulate: OutputModulator | None = None) -> Tensor:
        """`output + multiplier * modulate(adapter(x))` (no `modulate`: the fused kernel)."""
        if not self.enabled or multiplier == 0:
            return output
        if modulate is None:
            return self.adapter.add_bypass(module, x, output, multiplier)
        return torch.add(output, modulate(self, x, self.adapter.bypass(module, x)), alpha=multiplier)

    # -- merged ------------------------------------------------------------------------------
    def _patch(self, source: Tensor, out: Tensor) -> Tensor:
        return self.adapter.apply_(source, out, self.network.multiplier)

    def patch_weight(self) -> None:
        lora_patch.set_patch(self.module, self, self._patch, additive=self.adapter.dora_scale is None)

    def unpatch_weight(self) -> None:
        lora_patch.drop_patch(self.module, self)

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """``merged(W, m) - W`` in fp32: what this module adds to its layer's weight."""
        m = self.network.multiplier if multiplier is None else multiplier
        weight = self.module.weight.detach().float()
        return self.adapter.merged(weight, m) - weight


Mode = Literal["off", "hooks", "merged", "precalc"]


class LoRANetwork:
    """All adapters of one LoRA file, bound to one text encoder + U-Net pair."""

    def __init__(
        self,
        modules: dict[Target, Adapter],
        multiplier: float = 1.0,
        metadata: dict[str, str] | None = None,
        source: str = "",
    ) -> None:
        self.multiplier = float(multiplier)
        self.metadata: dict[str, str] = dict(metadata or {})
        self.source = source
        self.modules: list[LoRAModule] = [LoRAModule(self, t, a) for t, a in modules.items()]
        self.text_encoder_loras = [m for m in self.modules if m.target.component != "unet"]
        self.unet_loras = [m for m in self.modules if m.target.component == "unet"]
        self._applied = False  # apply_to() or use_unmerged() called and not removed
        self._owner_hooked = False  # use_unmerged(): the patch owner hooks the layers per batch
        self._patched: Literal[None, "merged", "precalc"] = None
        self._apply_te = True
        self._apply_unet = True

    # -- state -------------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        if self._patched is not None:
            return self._patched
        return "hooks" if self._applied else "off"

    def _active(self) -> list[LoRAModule]:
        return [
            m
            for m in self.modules
            if (m.target.component == "unet" and self._apply_unet)
            or (m.target.component != "unet" and self._apply_te)
        ]

    def is_mergeable(self) -> bool:
        return True

    # -- API ---------------------------------------------------------------------------------
    def apply_to(
        self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Attach un-merged: each target layer's output gets ``+ m * adapter(x)``.

        The models were given at creation; `text_encoder` / `unet` are accepted (and ignored)
        for call compatibility with kohya's signature.
        """
        del text_encoder, unet
        self._apply_te, self._apply_unet = apply_text_encoder, apply_unet
        self._applied, self._owner_hooked = True, False
        if self._patched is None:
            for module in self.modules:
                module.detach()
            for module in self._active():
                module.attach()
        logger.info("LoRA %s applied un-merged to %d layers", self.source, len(self._active()))

    def use_unmerged(self, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Un-merged, with the hooks left to the caller: see `unmerged_layers`."""
        self._apply_te, self._apply_unet = apply_text_encoder, apply_unet
        self._applied = self._owner_hooked = True
        if self._patched is None:
            with torch.no_grad():
                for module in self._active():
                    module.detach()
                    module.adapter.prepare(module.module)
        logger.info("LoRA %s used un-merged on %d layers", self.source, len(self._active()))

    def unmerged_layers(self) -> list[LoRAModule]:
        """The modules a caller must hook (after `use_unmerged`); none while merged or pre-calculated."""
        if not self._owner_hooked or self._patched is not None:
            return []
        return self._active()

    def remove(self) -> None:
        """Detach hooks and take back any merge: the models are exactly as before."""
        for module in self.modules:
            module.detach()
            module.adapter.clear_cache()
        self._unpatch()
        self._applied = self._owner_hooked = False

    def set_multiplier(self, multiplier: float) -> None:
        """Change the strength; merged / pre-calculated weights are rewritten at once."""
        multiplier = float(multiplier)
        if multiplier == self.multiplier:
            return
        self.multiplier = multiplier
        if self._patched is not None:
            with torch.no_grad():
                for module in self.modules:
                    lora_patch.refresh(module.module)

    def merge_to(self, *args: Any, **kwargs: Any) -> None:
        """Write ``multiplier * delta`` into the weights (backup kept; see `restore`).

        Positional/keyword arguments of kohya's signature (models, state dict, dtype,
        device) are accepted and ignored: this network already holds its weights and models.
        """
        del args, kwargs
        self._patch("merged")

    def pre_calculation(self) -> None:
        """Merge for the current multiplier so generation runs at merged speed.

        Hooks are detached while pre-calculated; `set_multiplier` recomputes the weights;
        `restore` goes back to un-merged hooks (if applied).
        """
        self._patch("precalc")

    def restore(self) -> None:
        """Undo `merge_to` / `pre_calculation` exactly; re-attach hooks if applied."""
        self._unpatch()
        if self._applied and not self._owner_hooked:
            for module in self._active():
                module.attach()
        elif self._owner_hooked:
            with torch.no_grad():
                for module in self._active():
                    module.adapter.prepare(module.module)

    #: kohya's name for undoing a pre-calculation.
    restore_weights = restore

    # -- internals ---------------------------------------------------------------------------
    @torch.no_grad()
    def _patch(self, mode: Literal["merged", "precalc"]) -> None:
        active = self._active() if self._applied else self.modules
        for module in self.modules:
            module.detach()
            module.adapter.clear_cache()  # un-merged caches are not needed while patched
        for module in active:
            module.patch_weight()
        self._patched = mode
        logger.info("LoRA %s %s into %d layers (multiplier %g)", self.source, mode, len(active), self.multiplier)

    @torch.no_grad()
    def _unpatch(self) -> None:
        if self._patched is None:
            return
        for module in self.modules:
            module.unpatch_weight()
        self._patched = None

    # -- conveniences ------------------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        """Switch the un-merged hooks on or off without detaching them."""
        for module in self.modules:
            module.enabled = enabled

    def summary(self) -> dict[str, int]:
        """Counts of adapters per family and per component (for logs and tests)."""
        counts = Counter(m.adapter.kind for m in self.modules)
        counts.update(m.target.component for m in self.modules)
        return dict(counts)

    def __repr__(self) -> str:
        return (f"LoRANetwork({self.source!r}, multiplier={self.multiplier}, layers={len(self.modules)}, "
                f"mode={self.mode})")


def _encoders(model: Any) -> tuple[nn.Module | None, nn.Module | None]:
    """(first, second) text encoder: kohya passes SDXL's two as a list, SD1/2's one alone."""
    if isinstance(model, (list, tuple)):
        if len(model) > 2:
            raise ValueError(f"at most two text encoders, got {len(model)}")
        return (model[0] if model else None), (model[1] if len(model) == 2 else None)
    return model, None


def create_network_from_weights(
    multiplier: float,
    file: str | Path | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    for_inference: bool = True,
    weights_sd: dict[str, Tensor] | None = None,
    **network_args: Any,
) -> LoRANetwork:
    """Load a LoRA / LyCORIS file (or `weights_sd`) for `text_encoder` + `unet`.

    `text_encoder` is one encoder (SD1/2) or SDXL's two as a list, kohya's convention.

    `vae` and `for_inference` exist for kohya's call signature (this network is always an
    inference network; the VAE is never patched). `network_args` are ignored, with a warning.
    Raises `UserError` for a missing / unreadable file, a file without LoRA weights, or one
    made for a different base model.
    """
    del vae, for_inference
    if network_args:
        logger.warning("--network_args %s ignored: this LoRA module takes no network arguments",
                       ", ".join(sorted(network_args)))
    label = str(file) if file is not None else "<state dict>"
    metadata: dict[str, str] = {}
    if weights_sd is None:
        if file is None:
            raise UserError("no LoRA file given; pass one with --network_weights")
        weights_sd, metadata = read_lora_file(file)
    first, second = _encoders(text_encoder)
    table = TargetTable(first, unet, second)
    try:
        parsed = parse_state_dict(weights_sd, table)
    except LayerMismatch as exc:
        families = ("SD1.x/SD2.x LoRAs do not fit SDXL" if table.dual
                    else "SD1.x and SD2.x LoRAs are not interchangeable")
        raise UserError(
            f"LoRA file {label} is for a different base model: layer {exc.target.name} has weight "
            f"{list(exc.target.weight_shape)} but the file's {exc.detail} does not fit it; "
            f"use a LoRA trained for this model ({families})"
        ) from exc
    if not parsed.adapters:
        if parsed.lora_like_keys:
            raise UserError(
                f"LoRA file {label} is for a different base model: none of its "
                f"{parsed.lora_like_keys} LoRA keys names a layer of this model (SDXL or another "
                "architecture?); use a LoRA trained for this model"
            )
        raise UserError(
            f"LoRA file {label} contains no LoRA weights (no lora_down/lora_up, lora_A/lora_B, "
            "LoHa or LoKr keys); pass a LoRA file to --network_weights"
        )
    if parsed.unknown_keys:
        logger.warning(
            "LoRA file %s: ignored %d keys that match no layer of this model (e.g. %s)",
            label,
            len(parsed.unknown_keys),
            parsed.unknown_keys[0],
        )
    network = LoRANetwork(parsed.adapters, multiplier, metadata, label)
    params = sum(t.numel() for a in parsed.adapters.values() for t in a.tensors())
    logger.info("loaded LoRA %s: %s, %.2fM parameters", label, network.summary(), params / 1e6)
    return network
