"""Names of the layers a LoRA file can patch, in every spelling the loader accepts.

A LoRA file names each layer it changes. Depending on the tool that wrote it, the same
U-Net layer is spelled

* kohya, diffusers module path:  ``lora_unet_down_blocks_0_attentions_0_proj_in``
* kohya, original LDM layout:     ``lora_unet_input_blocks_1_1_proj_in``
* diffusers / PEFT, dotted:       ``unet.down_blocks.0.attentions.0.proj_in``

and a text-encoder layer ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. SDXL has two text encoders:
kohya names CLIP ViT-L's layers ``lora_te1_...`` and OpenCLIP bigG's ``lora_te2_...``
(diffusers: ``text_encoder.`` / ``text_encoder_2.``); its U-Net layers are spelled as above,
e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` or
``lora_unet_middle_block_1_...``.

Instead of translating strings, this module walks the models' ``named_modules`` once and
builds a table from every accepted spelling to the real layer, so any model size works and a
name either resolves to an existing layer or is unknown. The LDM spelling of a U-Net layer
comes from the project's one table of the U-Net's LDM blocks, `library.models.unet_blocks`
(the same numbering the checkpoint exporter and XTI use).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from library.models.unet_blocks import has_block_layout, ldm_module_path

logger = logging.getLogger(__name__)

Component = Literal["unet", "text_encoder", "text_encoder_2"]
TEXT_COMPONENTS: tuple[Component, ...] = ("text_encoder", "text_encoder_2")

#: Kohya's default U-Net targets: every Linear / 1x1 conv inside these blocks.
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
#: Added by kohya's LoCon (``conv_dim``): every Linear / Conv2d inside these blocks.
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
#: Kohya's default text-encoder targets.
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP")


@dataclass(frozen=True, eq=False)
class Target:
    """One patchable layer: its canonical kohya name, path in its model, and the module."""

    name: str
    path: str
    component: Component
    module: nn.Module

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)


def is_patchable(module: nn.Module) -> bool:
    """Linear and Conv2d layers (subclasses included) are what LoRA formats patch."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


def kohya_name(component: Component, path: str, dual: bool = False) -> str:
    """Kohya's name for a layer: prefix plus the module path with dots as underscores.

    Text-encoder paths are written as ``text_model.<...>`` whether or not the loaded
    ``CLIPTextModel`` has the ``text_model`` wrapper (transformers 5 dropped it). With two
    text encoders (`dual`, SDXL) the first's prefix is ``lora_te1_``, the second's ``lora_te2_``.
    """
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    prefix = "lora_te2_" if component == "text_encoder_2" else "lora_te1_" if dual else "lora_te_"
    return prefix + canonical_te_path(path).replace(".", "_")


def canonical_te_path(path: str) -> str:
    """``encoder.layers.0...`` and ``text_model.encoder.layers.0...`` -> the latter."""
    return path if path.startswith("text_model.") else "text_model." + path


class TargetTable:
    """Every accepted spelling of every patchable layer of one model's text encoder(s) + U-Net
    (`text_encoder_2`: SDXL's second encoder)."""

    def __init__(self, text_encoder: nn.Module | None, unet: nn.Module | None,
                 text_encoder_2: nn.Module | None = None) -> None:
        self.targets: list[Target] = []
        self.dual = text_encoder_2 is not None
        self._by_kohya: dict[str, Target] = {}
        self._by_path: dict[Component, dict[str, Target]] = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
        if unet is not None:
            ldm_names = has_block_layout(unet)
            for path, module in unet.named_modules():
                if not is_patchable(module):
                    continue
                target = self._add("unet", path, module)
                ldm = ldm_module_path(unet, path) if ldm_names else None
                if ldm is not None:
                    self._by_kohya.setdefault(kohya_name("unet", ldm), target)
        for component, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if encoder is not None:
                for path, module in encoder.named_modules():
                    if is_patchable(module):
                        self._add(component, path, module)
        logger.debug("target table: %d layers, %d names", len(self.targets), len(self._by_kohya))

    def _add(self, component: Component, path: str, module: nn.Module) -> Target:
        target = Target(kohya_name(component, path, self.dual), path, component, module)
        self.targets.append(target)
        self._by_kohya[target.name] = target
        key = canonical_te_path(path) if component in TEXT_COMPONENTS else path
        self._by_path[component][key] = target
        return target

    def by_kohya_name(self, name: str) -> Target | None:
        """Resolve ``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...`` / ``lora_te2_...`` (either spelling)."""
        return self._by_kohya.get(name)

    def by_path(self, path: str, component: Component | None) -> Target | None:
        """Resolve a dotted module path; without a component try the U-Net, then the (first) TE."""
        components: Iterable[Component] = (component,) if component else ("unet", "text_encoder")
        for comp in components:
            key = canonical_te_path(path) if comp in TEXT_COMPONENTS else path
            found = self._by_path[comp].get(key)
            if found is not None:
                return found
        return None


def default_targets(
    text_encoder: nn.Module | None, unet: nn.Module | None, conv: bool = False,
    text_encoder_2: nn.Module | None = None,
) -> list[Target]:
    """The layers kohya's LoRA trains by default (plus the LoCon conv blocks if `conv`).

    U-Net: every Linear / Conv2d inside a ``Transformer2DModel`` (attention q/k/v/out,
    feed-forward, proj_in/out); with `conv` also every Linear / Conv2d inside
    ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``. Text encoder: the Linear layers of
    ``CLIPAttention`` and ``CLIPMLP`` (of both encoders of SDXL, `text_encoder_2` the second).
    Found by class name so any model size works.
    """
    found: list[Target] = []
    seen: set[int] = set()

    def collect(root: nn.Module | None, component: Component, blocks: tuple[str, ...]) -> None:
        if root is None:
            return
        for path, module in root.named_modules():
            if type(module).__name__ not in blocks:
                continue
            for child_path, child in module.named_modules():
                if is_patchable(child) and id(child) not in seen:
                    seen.add(id(child))
                    full = f"{path}.{child_path}" if path else child_path
                    found.append(Target(kohya_name(component, full, dual), full, component, child))

    dual = text_encoder_2 is not None
    collect(text_encoder, "text_encoder", TEXT_ENCODER_BLOCKS)
    collect(text_encoder_2, "text_encoder_2", TEXT_ENCODER_BLOCKS)
    collect(unet, "unet", UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if conv else ()))
    return found
