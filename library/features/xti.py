"""Extended Textual Inversion on the U-Net side: a text encoding per cross-attention layer.

Layer names. Each cross-attention transformer of the U-Net is named after the block it sits in
in the original (LDM) layout, which is how kohya's XTI files key their tensors (``IN01`` ..
``IN08``, ``MID``, ``OUT03`` .. ``OUT11`` for SD 1.x/2.x: 16 names; any other U-Net gets the
names of its own blocks, e.g. IN01, MID, OUT02, OUT03 for the tiny test model). A file's keys
must be exactly the model's names.

The prompt encoder returns a `library.text.encoder.Conditioning` whose ``per_layer`` states
hold one encoding per layer name when a prompt of the batch uses an XTI word. `PerLayerText`
is the feature that hands each cross-attention layer its states, through the patch owner's
``cross_attention_states`` point (`library.sampling.patches`); batches without XTI words pass
through unchanged. The ControlNet, which has no such layers, gets the default states.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from library.models.unet_blocks import cross_attention_layer_names
from library.sampling.patches import Batch, FeatureBase, Patch, RunSetup

logger = logging.getLogger(__name__)


class PerLayerText(FeatureBase):
    """The XTI feature: each named cross-attention layer attends to its own text states."""

    @classmethod
    def from_run(cls, setup: RunSetup) -> PerLayerText | None:
        """With XTI embeddings (`--XTI_embeddings`), the layers their vectors are for."""
        embeddings = setup.encoder.embeddings
        if embeddings is None or not embeddings.has_xti:
            return None
        return cls(setup.model.unet, embeddings.layer_names)

    def __init__(self, unet: torch.nn.Module, layer_names: Sequence[str]) -> None:
        found = cross_attention_layer_names(unet)
        missing = [n for n in layer_names if n not in found]
        if missing:
            raise ValueError(f"the U-Net has no cross-attention layers {missing}")
        self.layer_names = tuple(layer_names)

    def for_batch(self, batch: Batch) -> Patch:
        return _LayerStates()


class _LayerStates(Patch):
    def cross_attention_states(self, ctx, layer, states, cond):
        return states if cond is None or cond.per_layer is None else cond.per_layer[layer]
