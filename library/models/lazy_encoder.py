"""The VAE encoder, loaded on first use.

Plain txt2img never encodes an image: only img2img and inpainting sources, Highres fix
without latent upscaling, and user upscalers call `vae.encode`. `load_model(...,
vae_encoder="lazy")` therefore leaves the encoder's weights (34 M parameters, 0.14 GB in
fp32) in the checkpoint file and puts a `LazyEncoder` at `vae.encoder`. On the first call
(`vae.encode`, tiled encoding, or a direct call) or the first access to one of the encoder's
layers (`vae.encoder.down_blocks`, as `library.sampling.vae_slices` does), it builds the real encoder
from the file, replaces itself at `vae.encoder`, and forwards the call. The weights are
exactly those an eager load gives: cast to the dtype the VAE was loaded in, then to the VAE's
dtype and device *at that moment* (a VAE switched to fp32 by the NaN guard gets an fp32
encoder, rounded as an eagerly loaded one that was switched with it), so images do not change.

What stays unloaded: probes by name that only look for a feature (`hasattr(encoder,
"gradient_checkpointing")` when guidance enables checkpointing on the VAE, attention
processor walks) find nothing and load nothing; the VAE's `state_dict()` lacks the encoder
until it is loaded, which is why only a generating run asks for "lazy" (tools that save a
model load eagerly).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Assign = Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.dtype], None]


@dataclass
class _Pending:
    """What the load needs: the encoder built on the meta device and its source tensors."""

    vae: "weakref.ref[torch.nn.Module]"
    encoder: torch.nn.Module
    state: dict[str, torch.Tensor]
    assign: Assign
    dtype: torch.dtype  # what the rest of the VAE was loaded in


class LazyEncoder(torch.nn.Module):
    """Stands in for `vae.encoder` until first use; then loads it and hands over to it.

    Accessing one of the encoder's sub-layers by name (`conv_in`, `down_blocks`, ...) loads it;
    any other missing attribute raises AttributeError, as on any module without it.
    """

    def __init__(self, vae: torch.nn.Module, encoder: torch.nn.Module, state: dict[str, torch.Tensor],
                 assign: Assign, dtype: torch.dtype) -> None:
        super().__init__()
        # plain attributes: a module inside a dataclass is not registered as a child (no weights here)
        self._pending: _Pending | None = _Pending(weakref.ref(vae), encoder, state, assign, dtype)
        self._real: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self._layers = frozenset(name for name in encoder._modules) | {"layers_per_block"}

    @property
    def loaded(self) -> bool:
        """Whether the real encoder has been built."""
        return self._real is not None

    def load(self) -> torch.nn.Module:
        """The real encoder, built from the file on the first call and put at `vae.encoder`."""
        with self._lock:
            if self._real is None:
                self._real = self._build()
        return self._real

    def _build(self) -> torch.nn.Module:
        pending = self._pending
        assert pending is not None
        vae = pending.vae()
        if vae is None:
            raise RuntimeError("the VAE of this lazily loaded encoder no longer exists")
        reference = next(vae.decoder.parameters())
        encoder = pending.encoder
        pending.assign(encoder, pending.state, pending.dtype)
        encoder.to(reference.device, reference.dtype).train(vae.training).requires_grad_(reference.requires_grad)
        _same_attention(encoder, vae.decoder)
        vae.encoder = encoder
        self._pending = None
        logger.debug("VAE encoder loaded on first use (%s, %s)", reference.dtype, reference.device)
        return encoder

    def forward(self, *args, **kwargs):
        """The real encoder's forward (loading it first)."""
        return self.load()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name not in self.__dict__.get("_layers", ()):
                raise
        return getattr(self.load(), name)

    def extra_repr(self) -> str:
        return "loaded on first use" if self._real is None else "loaded"


def _same_attention(encoder: torch.nn.Module, decoder: torch.nn.Module) -> None:
    """Give the encoder's attention layers the decoder's processor where its kind differs from
    the built-in one (xformers enabled on the VAE before the encoder was loaded)."""
    chosen = next((m.processor for m in decoder.modules() if _attention(m)), None)
    for module in encoder.modules():
        if chosen is not None and _attention(module) and type(module.processor) is not type(chosen):
            module.set_processor(chosen)


def _attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def loaded_encoder(vae: torch.nn.Module) -> torch.nn.Module:
    """`vae.encoder`, loaded if it is a `LazyEncoder` (for code that walks its layers)."""
    encoder = vae.encoder
    return encoder.load() if isinstance(encoder, LazyEncoder) else encoder


def defer_encoder(vae: torch.nn.Module, state: dict[str, torch.Tensor], assign: Assign,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Put a `LazyEncoder` at `vae.encoder` (built on the meta device) holding the `encoder.*`
    tensors of the VAE's diffusers-named `state`, which the rest of the VAE is loaded in `dtype`
    from; that rest of `state` is returned for loading now."""
    prefix = "encoder."
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    vae.encoder = LazyEncoder(vae, vae.encoder, mine, assign, dtype)
    return {k: v for k, v in state.items() if not k.startswith(prefix)}
