"""LoRA asked for by `<lora:NAME:TE:UNET>` tags in the prompt (`library.prompts.extra_networks`).

Each image's tags are part of its `Job`, so a batch has one set of tags. For a batch with
tags, each tag's file is loaded once per run (kept for the next batches that use it, the
least recently used dropped past `KEEP`) as an un-merged `networks.lora` network, and its
layers are hooked by the patch owner with the tag's multipliers: TE for the text-encoder
layers, UNET for the U-Net's. The same hooks as an un-merged `--network_weights` network
(`library.features.lora.NetworkLayers`), so `<lora:x:0.5>` gives exactly the image of
`--network_weights x.safetensors --network_mul 0.5`; several tags (also the same one twice)
add up, and add to the `--network_module` networks and their `--am`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from library.features.lora import NetworkLayers
from library.images.hashes import lora_short_hash
from library.images.metadata import FeatureMetadata
from library.records.jobs import Job
from library.sampling.patches import Batch, FeatureBase, RunSetup

logger = logging.getLogger(__name__)

KEEP = 8  # networks kept loaded between batches


class PromptLoras(FeatureBase):
    """The `<lora:...>` tags of each batch, loaded on first use."""

    def __init__(self, text_encoder, unet) -> None:
        self.text_encoder, self.unet = text_encoder, unet
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._hashes: dict[str, str] = {}

    @classmethod
    def from_run(cls, setup: RunSetup) -> PromptLoras:
        """Always there: any prompt line may carry tags (it loads nothing until one does)."""
        return cls(setup.model.text_encoder, setup.model.unet)

    def check_job(self, job: Job) -> None:
        """Load the tags' files now, so that a file that does not fit the model skips its line."""
        for use in job.loras:
            self._network(use.path)

    def for_batch(self, batch: Batch) -> NetworkLayers | None:
        uses = batch.jobs[0].loras
        if not uses:
            return None
        layers = []
        for use in uses:
            for module in self._network(use.path).unmerged_layers():
                text = module.target.component == "text_encoder"
                layers.append((module, use.text_encoder if text else use.unet))
        return NetworkLayers(layers)

    def metadata(self, job: Job) -> FeatureMetadata:
        """`Lora hashes` of the image's tags (A1111's field; the tags themselves go into the prompt)."""
        if not job.loras:
            return FeatureMetadata()
        names = dict.fromkeys((use.name, use.path) for use in job.loras)
        listing = ", ".join(f"{name}: {self._hash(path)}" for name, path in names)
        return FeatureMetadata(parameters=(("Lora hashes", listing),))

    def _network(self, path: str):
        network = self._loaded.pop(path, None)
        if network is None:
            from networks.lora import create_network_from_weights

            network = create_network_from_weights(1.0, path, None, self.text_encoder, self.unet)
            network.use_unmerged()
            if len(self._loaded) >= KEEP:
                _, dropped = self._loaded.popitem(last=False)
                dropped.remove()
        self._loaded[path] = network
        return network

    def _hash(self, path: str) -> str:
        if path not in self._hashes:
            self._hashes[path] = lora_short_hash(Path(path))
        return self._hashes[path]
