"""The additional networks of a run (`--network_module/--network_weights`, LoRA and kin).

Loading follows the original: each network module's `create_network_from_weights` builds a
network for the text encoder and U-Net; the first `--network_merge_n_models` (all with
`--network_merge`) are merged into the weights, the others are used un-merged (or
pre-calculated with `--network_pre_calc`). Merges and pre-calculations are weight patches,
per run and exactly reversible (`networks.lora_patch`).

`Networks` is the patch owner's feature for the rest (`library.sampling.patches`): for each batch
it gives the un-merged layers to hook with the batch's multipliers (`--am`), and sets the
batch's multiplier on pre-calculated networks (whose weights `set_multiplier` rewrites) and on
network modules of other authors that have no `use_unmerged`/`unmerged_layers` (they attach
themselves with `apply_to` and follow `--am` through `set_multiplier`, as in the original).
Those multipliers are set by the patch's ``install`` point and set back to what they were at
the end of the batch.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from library.errors import UserError
from library.records.network_args import parse_network_args
from library.sampling.patches import Batch, BatchRun, FeatureBase, Patch, RunSetup

logger = logging.getLogger(__name__)


@dataclass
class Networks(FeatureBase):
    """The loaded networks; merged ones (the first `merged`) keep their multipliers."""

    loaded: list
    defaults: tuple[float, ...]
    merged: int = 0

    @classmethod
    def from_run(cls, setup: RunSetup) -> Networks | None:
        """The networks the run loaded before its pipeline (`load_networks`), when there are any."""
        networks = setup.networks
        return networks if networks is not None and networks.loaded else None

    def for_batch(self, batch: Batch) -> NetworkLayers | None:
        """The batch's `--am` multipliers: hooks for the un-merged layers, and the multiplier of
        each pre-calculated or self-attached network (None without any network to change)."""
        if not self.loaded:
            return None
        wanted = batch.jobs[0].network_multipliers or self.defaults
        if len(wanted) != len(self.loaded):
            raise UserError(f"--am has {len(wanted)} values but {len(self.loaded)} networks are loaded")
        layers, following = [], []
        for index, (network, value) in enumerate(zip(self.loaded, wanted)):
            if index < self.merged:
                continue
            hooked = network.unmerged_layers() if _owner_hooked(network) else []
            layers += [(module, float(value)) for module in hooked]
            if not hooked:  # merged-in-place (pre-calculated) or self-attached: the network follows --am
                following.append((network, float(value), float(self.defaults[index])))
        return NetworkLayers(layers, following) if layers or following else None

    def regional_layers(self, batch: Batch) -> tuple[dict[int, int], dict[int, float]]:
        """Regional LoRA (`library.features.attention_couple`): id(un-merged layer) -> its network's index,
        and each network's multiplier in this batch (`--am`)."""
        wanted = batch.jobs[0].network_multipliers or self.defaults
        owners = {id(m): i for i, net in enumerate(self.loaded) if _owner_hooked(net) for m in net.unmerged_layers()}
        return owners, {i: float(v) for i, v in enumerate(wanted)}


class NetworkLayers(Patch):
    """The un-merged LoRA layers of one batch, each with its multiplier, and the networks that
    follow the batch's multiplier themselves (pre-calculated or self-attached)."""

    def __init__(self, layers: Sequence[tuple[object, float]],
                 following: Sequence[tuple[object, float, float]] = ()) -> None:
        """`following`: (network, the batch's multiplier, the network's default multiplier)."""
        self.layers = list(layers)
        self.following = list(following)

    def lora_layers(self):
        return self.layers

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        """The batch's multiplier on each following network; `stack` sets its previous one back
        (a pre-calculated network's weights are rewritten both times, from the same backup)."""
        for network, value, default in self.following:
            previous = float(getattr(network, "multiplier", default))
            if value != previous:
                network.set_multiplier(value)
                stack.callback(network.set_multiplier, previous)


def _owner_hooked(network) -> bool:
    return callable(getattr(network, "unmerged_layers", None)) and callable(getattr(network, "use_unmerged", None))


def load_networks(options, model, regional: bool = False) -> Networks:
    """Load the networks of `options` (a `NetworkOptions`), then merge, pre-calculate or prepare them.

    `regional` (networks + region mask): all un-merged, so each delta can be masked per region.
    """
    muls = tuple(options.multipliers or [1.0] * len(options.modules))
    loaded = []
    for i, (module_name, weights) in enumerate(zip(options.modules, options.weights)):
        network = _create(module_name, weights, muls[i], options.args[i] if options.args else "", model)
        if options.show_meta:
            print(f"metadata of {weights}:")
            for key, value in sorted(getattr(network, "metadata", {}).items()):
                print(f"  {key}: {value}")
        loaded.append(network)
    merged = len(loaded) if options.merge else (options.merge_n_models or 0)
    pre_calc = options.pre_calc
    if regional and (merged or pre_calc):
        logger.info("regional LoRA: --network_merge / --network_merge_n_models / --network_pre_calc ignored; "
                    "the networks run un-merged so that each acts in its region only")
        merged, pre_calc = 0, False
    for network in loaded[:merged]:
        network.merge_to()
    for network in loaded[merged:]:
        if _owner_hooked(network):
            network.use_unmerged()
        else:
            network.apply_to()
        if pre_calc:
            network.pre_calculation()
    return Networks(loaded, muls, merged=merged)


def _create(module_name: str, weights: str, multiplier: float, args_text: str, model):
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--network_module {module_name}: cannot import it ({exc})") from None
    return module.create_network_from_weights(
        multiplier, weights, model.vae, text_encoders(model), model.unet, for_inference=True,
        **network_args(args_text),
    )


network_args = parse_network_args  # the loader's name for it


def text_encoders(model):
    """The text encoder, or SDXL's two as a list (kohya's `create_network_from_weights` convention)."""
    second = getattr(model, "text_encoder_2", None)
    return model.text_encoder if second is None else [model.text_encoder, second]
