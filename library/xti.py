"""Extended Textual Inversion on the U-Net side: a text encoding per cross-attention layer.

Layer names. Each cross-attention transformer of the U-Net is named after the block it sits in
in the original (LDM) layout, which is how kohya's XTI files key their tensors:

* ``INnn``: ``input_blocks[nn]``. LDM counts ``conv_in`` as input block 0, then one block per
  resnet (with its attention) of each down block, plus one for the block's downsampler.
  With 2 layers per block: down block 0 -> IN01, IN02 (IN03 is its downsampler), down block
  1 -> IN04, IN05, down block 2 -> IN07, IN08; the last down block of SD has no attention.
* ``MID``: the mid block.
* ``OUTnn``: ``output_blocks[nn]``: one block per resnet of each up block (the upsampler lives
  inside the last one). SD's up block 0 has no attention (OUT00-02); up blocks 1-3 -> OUT03-11.

So SD 1.x and 2.x get the 16 names of kohya's format (6 down, 1 mid, 9 up), and any other
U-Net gets the names of its own blocks, in U-Net order: the tiny test model (1 layer per
block, attention in down block 0 and up block 1) has IN01, MID, OUT02, OUT03. A file's keys
must be exactly the model's names. The names are computed from the modules the U-Net config
built (block types, resnets per block, down/upsamplers), not from a table.

Passing the per-layer encodings through the pipeline. The prompt encoder concatenates the L
layer encodings along the channel axis: (B, T, L*C) instead of (B, T, C). `PerLayerConditioning`
hooks the U-Net instance: when a call's ``encoder_hidden_states`` is L*C wide, it splits it,
installs a processor wrapper on every cross-attention (``attn2``) module that substitutes that
layer's (B, T, C) states, runs the U-Net, and restores the original processors afterwards,
even on an exception. Calls with ordinary C-wide states pass through untouched. Packing on the
channel axis (not the sequence axis) means code that is unaware of XTI and uses the packed
tensor fails on the shape instead of silently attending to 16 prompts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from library.models.unet_blocks import cross_attention_modules

logger = logging.getLogger(__name__)


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """LDM block name -> the cross-attention (`attn2`) modules of that block, in U-Net order."""
    return cross_attention_modules(unet)


def cross_attention_layer_names(unet: torch.nn.Module) -> list[str]:
    """The names of `cross_attention_layers`, in U-Net order (the order of packed states)."""
    return list(cross_attention_layers(unet))


def pack_layers(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer (B, T, C) states -> one (B, T, L*C) tensor (layer order kept)."""
    return torch.cat(list(states), dim=-1)


def unpack_layers(packed: torch.Tensor, layers: int) -> list[torch.Tensor]:
    """Inverse of `pack_layers`: L contiguous (B, T, C) tensors."""
    width = packed.shape[-1] // layers
    return [packed[..., i * width : (i + 1) * width].contiguous() for i in range(layers)]


class _LayerStates:
    """An attention processor that ignores the states it is given and uses its layer's."""

    def __init__(self, inner, states: torch.Tensor) -> None:
        self.inner = inner
        self.states = states

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states=self.states, attention_mask=attention_mask, **kwargs)


@contextmanager
def layer_states_installed(
    layers: Sequence[Sequence[torch.nn.Module]], states: Sequence[torch.Tensor]
) -> Iterator[None]:
    """While inside, cross-attention layer i attends to `states[i]`; processors are restored after."""
    saved: list[tuple[torch.nn.Module, object]] = []
    try:
        for modules, layer_states in zip(layers, states, strict=True):
            for attn in modules:
                saved.append((attn, attn.processor))
                attn.set_processor(_LayerStates(attn.processor, layer_states))
        yield
    finally:
        for attn, processor in reversed(saved):
            attn.set_processor(processor)


class PerLayerConditioning:
    """Hooks one U-Net so that (B, T, L*C) `encoder_hidden_states` condition each layer separately."""

    def __init__(self, unet: torch.nn.Module, layer_names: Sequence[str]) -> None:
        found = cross_attention_layers(unet)
        missing = [n for n in layer_names if n not in found]
        if missing:
            raise ValueError(f"the U-Net has no cross-attention layers {missing}")
        self.unet = unet
        self.layer_names = tuple(layer_names)
        self.layers = [found[n] for n in layer_names]
        self.width = int(self.layers[0][0].to_k.in_features)
        self._stack: list = []
        self._handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True),
            unet.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]
        logger.debug("XTI: %d cross-attention layers take their own text states", len(self.layers))

    def remove(self) -> None:
        """Unhook the U-Net."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module, args, kwargs):
        positional = "encoder_hidden_states" not in kwargs and len(args) > 2
        states = args[2] if positional else kwargs.get("encoder_hidden_states")
        if states is None or states.shape[-1] != len(self.layers) * self.width:
            self._stack.append(None)
            return None
        per_layer = unpack_layers(states, len(self.layers))
        context = layer_states_installed(self.layers, per_layer)
        context.__enter__()
        self._stack.append(context)
        if positional:
            args = (*args[:2], per_layer[0], *args[3:])
        else:
            kwargs = {**kwargs, "encoder_hidden_states": per_layer[0]}
        return args, kwargs

    def _after(self, module, args, kwargs, output):
        context = self._stack.pop() if self._stack else None
        if context is not None:
            context.__exit__(None, None, None)
        return None
