"""Hypernetworks (`--hypernetwork FILE --hypernetwork_mul M`, `<hypernet:NAME:MULT>` tags).

Each image's hypernetworks are part of its `Job` (the run's `--hypernetwork` files first,
then its prompt's tags), so a batch has one list. For a batch with any, the patch puts a
forward pre-hook on the key and value projections (``to_k``, ``to_v``) of every attention
layer of the U-Net, self- and cross-attention: their input (the context) becomes
``context + MLP(context) * mult`` per hypernetwork, in turn, with the MLP of the context's
width (`networks.hypernetwork`); a width the file has no entry for passes through, queries are
untouched. A multiplier of 0 leaves the hypernetwork out. The hooks sit on the projections
themselves, so they compose with any attention processor (Attention Couple, XTI), with LoRA
(whose deltas then see the changed context, as in the web UI), ControlNet and Deep Shrink.
Files are loaded once per run and kept (they are small).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack

from torch import nn

from library.images.metadata import FeatureMetadata
from library.records.jobs import Job
from library.sampling.patches import Batch, BatchRun, FeatureBase, Patch, RunSetup

logger = logging.getLogger(__name__)


class Hypernetworks(FeatureBase):
    """The hypernetworks of each batch, read on first use."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self._loaded: dict[str, object] = {}

    @classmethod
    def from_run(cls, setup: RunSetup) -> Hypernetworks:
        """Always there: any prompt line may carry `<hypernet:...>` tags (they are read when one does);
        the `--hypernetwork` files are read now, so that a bad one ends the run before any image."""
        feature = cls(setup.model.unet)
        for path in setup.options.dialect.hypernetworks:
            feature._network(path)
        return feature

    def check_job(self, job: Job) -> None:
        """Read the files now: one that cannot be a hypernetwork skips its prompt line."""
        for use in job.hypernetworks:
            self._network(use.path)

    def for_batch(self, batch: Batch) -> HypernetworkPatch | None:
        uses = [(self._network(u.path), u.multiplier) for u in batch.jobs[0].hypernetworks if u.multiplier != 0]
        return HypernetworkPatch(self.unet, uses) if uses else None

    def metadata(self, job: Job) -> FeatureMetadata:
        """A1111's `Hypernet` (names) and `Hypernet strength` fields."""
        if not job.hypernetworks:
            return FeatureMetadata()
        names = ", ".join(u.name for u in job.hypernetworks)
        strengths = ", ".join(f"{u.multiplier:g}" for u in job.hypernetworks)
        return FeatureMetadata(parameters=(("Hypernet", names), ("Hypernet strength", strengths)))

    def _network(self, path: str):
        if path not in self._loaded:
            from networks.hypernetwork import read_hypernetwork

            device = next(self.unet.parameters()).device
            self._loaded[path] = read_hypernetwork(path).to(device)
            logger.info("hypernetwork %s: widths %s", path, sorted(self._loaded[path].layers))
        return self._loaded[path]


class HypernetworkPatch(Patch):
    """Pre-hooks on every U-Net attention's `to_k` / `to_v` for one batch."""

    def __init__(self, unet: nn.Module, uses: Sequence[tuple[object, float]]) -> None:
        self.unet, self.uses = unet, list(uses)

    def install(self, stack: ExitStack, run: BatchRun | None) -> None:
        for module in attention_modules(self.unet):
            for which, projection in enumerate((module.to_k, module.to_v)):
                handle = projection.register_forward_pre_hook(self._hook(which))
                stack.callback(handle.remove)

    def _hook(self, which: int):
        def hook(module, args):
            context = args[0]
            for network, multiplier in self.uses:
                context = network.apply(context, which, multiplier)
            return (context, *args[1:])
        return hook


def attention_modules(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's attention layers (diffusers `Attention`: self and cross, in every transformer block)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]
