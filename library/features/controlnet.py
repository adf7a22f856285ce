"""ControlNet: hint images, their preprocessing, and which ControlNet runs at which step.

Options (the manual's names): `--control_net_models` (one or more ControlNet 1.0 files or
Diffusers folders, loaded by `library.models.controlnet`), `--control_net_preps`,
`--control_net_weights`, `--control_net_ratios` (one value per model; missing ones take the
original's defaults none / 1.0 / 1.0, `library.cli.compat`),
and `--guide_image_path` (an image, or a folder whose images are used in turn, like
`--image_path`: image n of the run uses guide n mod count; with several ControlNets the guides go
in groups, ControlNet k of an image getting guide k of its group, `GuideImages`).

Semantics, as the manual describes the original:

* With several ControlNets they take turns, one per U-Net call: call i uses ControlNet
  i mod n (the web UI's extension instead adds them all up at every step).
* A ratio r applies a ControlNet during the first r of the U-Net calls of the loop
  (r = 0.5: the first half). img2img counts the calls it actually runs.
* The weight scales the ControlNet's residuals (0 = no effect, 1 = as trained).
* Preprocessing: `canny` (edges with OpenCV, thresholds 100 and 200) or `canny_LOW_HIGH`
  (e.g. `canny_63_191`), or `none` for hint images prepared beforehand. The guide is first
  resized (Lanczos) to the size of the image being generated, then preprocessed, so edges
  are found at the resolution the ControlNet sees. The hint is RGB in [0, 1].
* Classifier-free guidance: every copy of the batch (conditional, unconditional, negative)
  gets the hint, as in diffusers' ControlNet pipeline without "guess mode".

ControlNet is a feature of the patch owner (`library.sampling.patches`): it changes the U-Net only
through the ``unet_kwargs`` point (`down_block_additional_residuals`,
`mid_block_additional_residual`), computed from the default text states (with XTI, the
ControlNet sees the first layer's states: it has no per-layer cross-attention). Its ``install``
point hooks each ControlNet's hint embedding for the batch, so that the hint's features follow
the size of the U-Net call's sample (Gradual Latent).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.images import input_images as image_io
from library.images.metadata import FeatureMetadata
from library.sampling.patches import Batch, BatchRun, FeatureBase, Patch, RunSetup

logger = logging.getLogger(__name__)

CANNY_DEFAULT = (100, 200)
_CANNY = re.compile(r"canny(?:_(\d+)_(\d+))?")


@dataclass(frozen=True)
class Prep:
    """How a guide image becomes a hint: Canny edges with two thresholds, or as it is."""

    kind: str  # "canny" or "none"
    low: int = CANNY_DEFAULT[0]
    high: int = CANNY_DEFAULT[1]

    @property
    def label(self) -> str:
        return f"canny_{self.low}_{self.high}" if self.kind == "canny" else "none"


def parse_prep(text: str) -> Prep:
    """`none`, `canny` or `canny_LOW_HIGH` -> Prep; anything else is a UserError."""
    if text.lower() == "none":
        return Prep("none")
    match = _CANNY.fullmatch(text.lower())
    if match is None:
        raise UserError(f"--control_net_preps {text}: unknown preprocessing; use none, canny or canny_LOW_HIGH "
                        "(e.g. canny_63_191)")
    if match.group(1) is None:
        return Prep("canny")
    low, high = int(match.group(1)), int(match.group(2))
    if not low <= high:
        raise UserError(f"--control_net_preps {text}: the first threshold must not exceed the second")
    return Prep("canny", low, high)


def hint_array(image: Image.Image, prep: Prep, width: int, height: int) -> np.ndarray:
    """The hint of `image` for a width x height picture: (height, width, 3) uint8 RGB."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(image.convert("RGB"))
    if prep.kind == "none":
        return pixels
    import cv2

    edges = cv2.Canny(pixels, prep.low, prep.high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def hint_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 hints -> a float32 (B, 3, H, W) batch in [0, 1]."""
    stacked = np.stack(arrays).astype(np.float32) / 255.0
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ControlUnit:
    """One loaded ControlNet and how to use it."""

    model: torch.nn.Module
    name: str
    prep: Prep
    weight: float
    ratio: float


class ControlNets(FeatureBase):
    """The run's ControlNets; `for_batch` gives a batch's per-call U-Net arguments."""

    def __init__(self, units: list[ControlUnit]) -> None:
        if not units:
            raise ValueError("ControlNets needs at least one unit")
        self.units = units

    @classmethod
    def from_run(cls, setup: RunSetup) -> ControlNets | None:
        """`--control_net_models` loaded for the run's U-Net, with their preps, weights and ratios."""
        from library.models.controlnet import load_controlnet

        options = setup.options.controlnet
        if not options.models:
            return None
        if setup.model.kind.family == "sdxl":
            raise UserError("--control_net_models: ControlNet 1.0 models are SD 1.x/2.x models; SDXL ControlNets "
                            "(and ControlNet-LLLite) are not supported yet")
        count = len(options.models)
        preps = [parse_prep(p) for p in per_model(options.preps, count, "none")]
        weights = per_model(options.weights, count, 1.0)
        ratios = per_model(options.ratios, count, 1.0)
        units = []
        for name, prep, weight, ratio in zip(options.models, preps, weights, ratios, strict=True):
            net = load_controlnet(name, setup.model.unet, setup.dtype, setup.device)
            units.append(ControlUnit(net, Path(name).name, prep, weight, ratio))
            logger.info("ControlNet %s: preprocessing %s, weight %g, ratio %g", Path(name).name, prep.label, weight,
                        ratio)
        return cls(units)

    def mirrors(self) -> list[torch.nn.Module]:
        """The ControlNets: their down paths mirror the U-Net's (Deep Shrink shrinks them too)."""
        return [unit.model for unit in self.units]

    def unit_at(self, call: int, calls: int) -> int | None:
        """Index of the ControlNet of U-Net call `call` of `calls`: units take turns, each within its ratio."""
        index = call % len(self.units)
        unit = self.units[index]
        return index if call < unit.ratio * calls and unit.weight != 0 else None

    def hints(self, guides: Sequence[Sequence[str]], width: int, height: int) -> list[torch.Tensor]:
        """One (B, 3, H, W) hint batch per unit: `guides[b]` are image b's guide files, one per unit
        or one for all units."""
        cache: dict[tuple[str, Prep], np.ndarray] = {}

        def hint(path: str, prep: Prep) -> np.ndarray:
            if (path, prep) not in cache:
                cache[path, prep] = hint_array(image_io.load_rgb(Path(path)), prep, width, height)
            return cache[path, prep]

        return [hint_tensor([hint(own[k % len(own)], unit.prep) for own in guides])
                for k, unit in enumerate(self.units)]

    def metadata(self, job) -> FeatureMetadata:
        """A1111-style `ControlNet N` parameters of an image with a guide image (none without)."""
        if job.guide_image is None:
            return FeatureMetadata()
        items = []
        for n, unit in enumerate(self.units):
            parts = [f"Module: {unit.prep.kind}", f"Model: {unit.name}", f"Weight: {unit.weight:g}"]
            if unit.prep.kind == "canny":
                parts += [f"Threshold A: {unit.prep.low}", f"Threshold B: {unit.prep.high}"]
            parts += ["Guidance Start: 0", f"Guidance End: {unit.ratio:g}"]
            items.append((f"ControlNet {n}", ", ".join(parts)))
        return FeatureMetadata(parameters=tuple(items))

    def for_batch(self, batch: Batch) -> BatchControl | None:
        """The batch's per-call guidance, when its images have guide images."""
        first = batch.jobs[0]
        if first.guide_image is None:
            return None
        hints = self.hints([j.control_guides or (j.guide_image,) for j in batch.jobs], first.width, first.height)
        copies = batch.layout.copies
        return BatchControl(self, [torch.cat([h] * copies).to(batch.device, batch.dtype) for h in hints])


class BatchControl(Patch):
    """ControlNet residuals for each U-Net call of one batch's loop."""

    def __init__(self, nets: ControlNets, hints: list[torch.Tensor]) -> None:
        self.nets, self.hints = nets, hints

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        """Hook each ControlNet's hint embedding for the batch: its features take the size of the
        current U-Net call's sample (`run.sample`), see `sized_hint_features`."""
        models = {id(unit.model): unit.model for unit in self.nets.units}
        for model in models.values():
            embedding = getattr(model, "controlnet_cond_embedding", None)
            if embedding is not None:
                hook = _HintSize(run)
                stack.callback(embedding.register_forward_hook(hook).remove)

    def unet_kwargs(self, ctx, sample: torch.Tensor, timestep: torch.Tensor, cond) -> dict | None:
        """Residuals of the ControlNet whose turn call `ctx.step` is, or nothing."""
        index = self.nets.unit_at(ctx.step, ctx.steps)
        if index is None:
            return None
        unit = self.nets.units[index]
        hint = self.hints[index] if ctx.rows is None else self.hints[index][list(ctx.rows)]
        down, mid = unit.model(
            sample, timestep, encoder_hidden_states=cond.states, controlnet_cond=hint,
            conditioning_scale=unit.weight, return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class _HintSize:
    """A forward hook on a ControlNet's hint embedding: its features at the size of the sample
    of the batch's current U-Net call (`BatchRun.sample`)."""

    def __init__(self, run: BatchRun) -> None:
        self.run = run

    def __call__(self, module, inputs, features: torch.Tensor) -> torch.Tensor | None:
        return sized_hint_features(features, tuple(self.run.sample.shape[-2:]))


def sized_hint_features(features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor | None:
    """A hint's features (the output of the hint embedding, at the image's latent size) for a
    ControlNet that runs on a smaller sample (Gradual Latent's early steps): resized bicubic in
    fp32, as the original does; None (unchanged) when they already have that size."""
    if tuple(features.shape[-2:]) == tuple(size):
        return None
    return F.interpolate(features.float(), size=size, mode="bicubic").to(features.dtype)


def per_model(values: Sequence | None, count: int, default) -> list:
    """One value per model: the first models take the values given, the others `default`, as in
    the original (one value is the first model's, not every model's).

    The command line checked there are not more values than models
    (`library.cli.validation.validate_controlnet`); more is a bug.
    """
    values = list(values or [])
    if len(values) > count:
        raise ValueError(f"{len(values)} values for {count} ControlNets")
    return values + [default] * (count - len(values))
