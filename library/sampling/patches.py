"""The one owner of everything that changes a denoising step: typed patch points per batch.

Every feature that changes how a batch is denoised (inpainting's re-imposition, LoRA un-merged
and `--am`, XTI, ControlNet, Attention Couple, guidance, Deep Shrink, Gradual Latent) is a
`Feature` (`FeatureBase` gives the no-op defaults): `from_run(setup)` builds it from the run's
`RunSetup` (None when the run does not use it), `check_job(job)` refuses a Job it cannot make,
`metadata(job)` is what it writes into that image's file, and `for_batch(batch) -> Patch | None`
is its change to one batch. The run's features are one tuple (`library.features.FEATURES`). The
loop installs the batch's patches in
one `with owner.installed(batch)` block; every hook and processor wrapper the owner put on the
models is removed when the block ends, also on error and Ctrl-C, so the U-Net is exactly as
before the batch. `for_batch` changes nothing: whatever else a patch changes for its batch (a
hook of its own, a model flag, a network's multiplier) it does in its ``install`` point, on the
owner's `ExitStack`, so the same block undoes it.

A `Patch` overrides only the points it needs; each has a pass-through default, and the owner
installs a hook only for points some patch overrides (a batch without features runs the bare
U-Net). Points, in the order a step meets them:

=========================  =================================================================
``install``                once per batch, before the loop: the patch's own effects, entered on
                           the owner's `ExitStack` (``stack.callback``, ``stack.enter_context``)
``start``                  the latents the loop starts from (inpainting's first blend)
``text_encoding``          the text encoder is about to encode rows of one role / prompt part
``lora_layers``            LoRA modules hooked for this batch, with their multipliers
``lora_output``            a LoRA module's delta before it is added (regional masks)
``scale_model_input``      the U-Net's input of a step (the scheduler's scaling by default); at
                           most one patch per batch
``unet_kwargs``            extra U-Net arguments; residuals of several producers add up
``down_block_input``       the hidden state entering ``down_blocks[depth]`` (SDXL: input block
                           ``depth``, `library.sampling.entry_blocks`)
``before_skip_concat``     the hidden state before up block i concatenates its j-th skip
``cross_attention_states`` the text states a cross-attention layer attends to (XTI)
``cross_attention_output`` a cross-attention layer's output; ``attend(states, tag)`` runs it (the
                           ``lora_output`` calls inside see ``ctx.attention == tag``)
``after_cfg``              the noise prediction after CFG combines (gradients may be enabled here)
``guide``                  the latents and noise prediction before the scheduler step; may run
                           the U-Net again on some rows (``unet(sample, rows)``, with grad)
``scheduler_step``         replaces the scheduler step (at most one patch per batch); a patch
                           that makes every step itself also overrides ``scale_model_input``
                           (a diffusers scheduler scales by a position only its ``step`` advances)
``after_step``             the latents after the scheduler step (inpainting)
=========================  =================================================================

A ``guide`` patch's extra U-Net call runs only some rows of the layout; its `StepContext` has
``rows`` set, and a producer of per-row U-Net arguments (ControlNet's hints) takes those rows.

Cross-attention layers and blocks are named as in the original LDM layout (``IN01``, ``MID``,
``OUT08``), from `library.models.unet_blocks`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor, nn

from library.images.metadata import FeatureMetadata
from library.sampling.step_math import sigma_at

if TYPE_CHECKING:
    from library.models import LoadedModel
    from library.records.jobs import Job
    from library.records.options import Options
    from library.text.encoder import Conditioning, PromptEncoder
    from library.text.sdxl_encoder import DualPromptEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How one batch is laid out in the U-Net's input rows.

    Rows are ``copies`` groups of ``images`` rows: [uncond..., cond...] with CFG, [empty...,
    cond..., negative...] with a negative scale, [cond...] without guidance.
    """

    images: int
    copies: int
    latent_height: int
    latent_width: int

    @property
    def rows(self) -> int:
        return self.images * self.copies


@dataclass(frozen=True)
class SourceLatents:
    """img2img's source of a batch: clean latents, their img2img noise, optional masks (1 = repaint)."""

    latents: Tensor
    noise: Tensor
    masks: Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """What features see of one batch when they make their patches."""

    jobs: tuple[Job, ...]
    layout: BatchLayout
    scheduler: object
    timesteps: Tensor  # the timesteps this loop runs (img2img: the tail)
    device: torch.device
    dtype: torch.dtype
    source: SourceLatents | None = None
    generators: tuple[torch.Generator, ...] = ()  # each image's own random stream (step noise)


@dataclass(frozen=True)
class StepContext:
    """One U-Net call of a batch's loop, handed to every patch point."""

    step: int  # index of this call in the loop (0-based)
    steps: int  # U-Net calls in this loop
    timestep: int  # the scheduler timestep passed to the U-Net (0..999)
    sigma: float | None  # the noise level of sigma schedulers (Euler, DPM, ...); None for DDIM/PNDM
    layout: BatchLayout
    # the layout rows a U-Net call runs (a `guide` patch's extra call on some rows); None: all rows
    rows: tuple[int, ...] | None = None
    # while a `cross_attention_output` patch runs `attend(states, tag)`: its `tag`, for the
    # `lora_output` calls of that attention (Attention Couple's part); None otherwise
    attention: object | None = None

    @property
    def last(self) -> bool:
        return self.step + 1 == self.steps


class LoRALayer(Protocol):
    """What the owner needs of one LoRA adapter (`networks.lora.LoRAModule`)."""

    module: nn.Module

    def add_output(self, module: nn.Module, x: Tensor, output: Tensor, multiplier: float,
                   modulate: Callable | None = None) -> Tensor: ...


#: `attend(states, tag=None)`: the layer's attention on `states`; the `lora_output` calls made
#: inside it see `ctx.attention == tag`.
Attend = Callable[..., Tensor]
TextRole = Literal["prompt", "negative", "empty"]

#: `unet(sample, rows)`: the U-Net's prediction for `sample` (one input row per entry of `rows`)
#: with the text states of those layout rows, through every patch's arguments and hooks.
RowsUNet = Callable[[Tensor, Sequence[int]], Tensor]


class Patch:
    """One feature's changes to one batch. Override the points you need (module docstring)."""

    #: shown in the progress bar of the batch's loop (e.g. "CLIP guidance"), or None
    progress_label: str | None = None

    def install(self, stack: ExitStack, run: BatchRun) -> None:
        """The patch's own effects on the models for this batch, each entered on `stack` so that
        the end of the batch undoes it (also on error and Ctrl-C). `run` tells the hooks about the
        current call (`BatchRun.ctx`, `.sample`, `.cond`, `.text`)."""

    def start(self, latents: Tensor) -> Tensor:
        return latents

    def text_encoding(self, role: TextRole, part: int) -> None:
        """The loop is about to encode the batch's `role` rows ("prompt", "negative", or "empty"
        with a negative scale); `part` is the prompt part (split at ` AND `; 0 otherwise).
        The `lora_output` calls that follow (ctx None) belong to these texts."""

    def lora_layers(self) -> Sequence[tuple[LoRALayer, float]]:
        return ()

    def lora_output(self, ctx: StepContext | None, layer: LoRALayer, x: Tensor, delta: Tensor) -> Tensor:
        """`ctx` is None while the text encoder runs (before the first step)."""
        return delta

    def scale_model_input(self, ctx: StepContext, sample: Tensor, default: Callable[[Tensor], Tensor]) -> Tensor:
        """The U-Net's input for `sample` (the batch's rows); `default` is the scheduler's scaling."""
        return default(sample)

    def unet_kwargs(self, ctx: StepContext, sample: Tensor, timestep: Tensor, cond: Conditioning) -> dict | None:
        return None

    def down_block_input(self, ctx: StepContext, depth: int, hidden: Tensor) -> Tensor:
        return hidden

    def before_skip_concat(self, ctx: StepContext, up_index: int, layer: int, hidden: Tensor, skip: Tensor) -> Tensor:
        return hidden

    def cross_attention_states(self, ctx: StepContext, layer: str, states: Tensor, cond: Conditioning) -> Tensor:
        return states

    def cross_attention_output(self, ctx: StepContext, layer: str, hidden: Tensor, states: Tensor,
                               attend: Attend) -> Tensor:
        return attend(states)

    def after_cfg(self, ctx: StepContext, latents: Tensor, eps: Tensor) -> Tensor:
        return eps

    def guide(self, ctx: StepContext, latents: Tensor, eps: Tensor, unet: RowsUNet) -> tuple[Tensor, Tensor]:
        """(latents, eps) for the scheduler step; `unet` runs the U-Net again on chosen rows
        (CLIP / VGG guidance: its second pass, with gradients enabled by the patch)."""
        return latents, eps

    def scheduler_step(self, ctx: StepContext, eps: Tensor, latents: Tensor,
                       default: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        return default(eps, latents)

    def after_step(self, ctx: StepContext, latents: Tensor) -> Tensor:
        return latents


@dataclass(frozen=True)
class RunSetup:
    """What the features of a run build themselves from (`Feature.from_run`), made once by
    `library.run.build.pipeline`."""

    options: Options  # the run's option records (`library.records.options`)
    model: LoadedModel
    device: torch.device
    dtype: torch.dtype  # the U-Net's and the features' models'
    vae_dtype: torch.dtype
    encoder: PromptEncoder | DualPromptEncoder
    # the run's networks (`library.features.lora.Networks`), loaded before the pipeline; None without
    networks: Feature | None = None


class Feature(Protocol):
    """Something that may change how a batch is denoised, and what it writes into each image."""

    @classmethod
    def from_run(cls, setup: RunSetup) -> Feature | None:
        """The feature of this run, or None when the run does not use it."""
        ...

    def check_job(self, job: Job) -> None:
        """Raise `UserError` for a Job this feature cannot make (its prompt line is then skipped)."""
        ...

    def metadata(self, job: Job) -> FeatureMetadata:
        """What this feature writes into `job`'s image: PNG text keys and A1111 `parameters` fields."""
        ...

    def mirrors(self) -> Sequence[nn.Module]:
        """Models whose ``down_blocks`` mirror the U-Net's (ControlNets; see `PatchOwner`)."""
        ...

    def for_batch(self, batch: Batch) -> Patch | None:
        """This feature's change to one batch, or None when the batch does not use it."""
        ...


class FeatureBase:
    """A `Feature` with no-op defaults: a feature overrides only what it needs."""

    @classmethod
    def from_run(cls, setup: RunSetup) -> Feature | None:
        return None

    def check_job(self, job: Job) -> None:
        return None

    def metadata(self, job: Job) -> FeatureMetadata:
        return FeatureMetadata()

    def mirrors(self) -> Sequence[nn.Module]:
        return ()

    def for_batch(self, batch: Batch) -> Patch | None:
        return None


class FixedFeature(FeatureBase):
    """A feature whose `for_batch` always gives the same patch (tests, benchmarks, one-off changes)."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def for_batch(self, batch: Batch) -> Patch:
        return self.patch


def _overrides(patch: Patch, point: str) -> bool:
    return getattr(type(patch), point) is not getattr(Patch, point)


class PatchOwner:
    """Installs the patches of the run's features on one U-Net for one batch at a time.

    `mirrors` are models whose ``down_blocks`` mirror the U-Net's (ControlNets): the
    ``down_block_input`` point applies to their down paths too, so their residuals keep
    fitting the U-Net's skips.
    """

    def __init__(self, unet: nn.Module, features: Sequence[Feature] = (), mirrors: Sequence[nn.Module] = ()) -> None:
        self.unet = unet
        self.features = list(features)
        self.mirrors = list(mirrors)

    def add(self, feature: Feature) -> None:
        self.features.append(feature)

    @contextmanager
    def installed(self, batch: Batch) -> Iterator[BatchRun]:
        """The batch's patches installed; all removed on exit (also on error and Ctrl-C)."""
        patches = [p for p in (f.for_batch(batch) for f in self.features) if p is not None]
        with ExitStack() as stack:
            run = BatchRun(self.unet, batch, patches)
            run.install(stack, self.mirrors)
            yield run


class BatchRun:
    """The patch points of one installed batch, called by the loop and by the owner's hooks."""

    def __init__(self, unet: nn.Module, batch: Batch, patches: list[Patch]) -> None:
        self.unet, self.batch, self.patches = unet, batch, patches
        # the current call, for hooks and patches that need more than their point's arguments:
        self.ctx: StepContext | None = None  # the U-Net call
        self.sample: Tensor | None = None  # that call's input (Gradual Latent makes it smaller)
        self.cond: Conditioning | None = None  # that call's text states
        self.text: tuple[TextRole, int] | None = None  # the texts the text encoder encodes now
        self._with = {point: [p for p in patches if _overrides(p, point)] for point in _POINTS}
        for point in ("scale_model_input", "scheduler_step"):
            owners = self._with[point]
            if len(owners) > 1:
                raise ValueError(f"two patches replace {point}: {[type(p).__name__ for p in owners]}")

    # -- the loop's calls -------------------------------------------------------------------
    def start(self, latents: Tensor) -> Tensor:
        for patch in self._with["start"]:
            latents = patch.start(latents)
        return latents

    def text_encoding(self, role: TextRole, part: int = 0) -> None:
        """Tell the patches which rows the text encoder encodes next (see `Patch.text_encoding`)."""
        self.text = (role, part)
        for patch in self._with["text_encoding"]:
            patch.text_encoding(role, part)

    def description(self, base: str) -> str:
        """The progress bar's text: `base` and the patches' labels, e.g. "steps (CLIP guidance)"."""
        labels = [p.progress_label for p in self.patches if p.progress_label]
        return f"{base} ({', '.join(labels)})" if labels else base

    def context(self, step: int, timestep: Tensor) -> StepContext:
        """The context of U-Net call `step` (also what the hooks see until the next call)."""
        self.ctx = StepContext(step, len(self.batch.timesteps), int(timestep), self._sigma(step), self.batch.layout)
        return self.ctx

    def scale_model_input(self, ctx: StepContext, sample: Tensor, default: Callable[[Tensor], Tensor]) -> Tensor:
        """The U-Net's input of step `ctx`: the one patch's scaling, else `default` (the scheduler's)."""
        owners = self._with["scale_model_input"]
        return owners[0].scale_model_input(ctx, sample, default) if owners else default(sample)

    def unet_call(self, ctx: StepContext, sample: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The U-Net's prediction for `sample` with the patches' arguments and hooks."""
        self.ctx, self.sample, self.cond = ctx, sample, cond
        kwargs: dict = {}
        for patch in self._with["unet_kwargs"]:
            kwargs = _add_kwargs(kwargs, patch.unet_kwargs(ctx, sample, timestep, cond) or {})
        added = cond.added_cond_kwargs()  # SDXL: pooled text and size numbers per row
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return self.unet(sample, timestep, encoder_hidden_states=cond.states, **kwargs).sample

    def after_cfg(self, ctx: StepContext, latents: Tensor, eps: Tensor) -> Tensor:
        for patch in self._with["after_cfg"]:
            eps = patch.after_cfg(ctx, latents, eps)
        return eps

    def guide(self, ctx: StepContext, latents: Tensor, eps: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """The `guide` patches in turn; their `unet(sample, rows)` runs `unet_call` on those rows."""
        if not self._with["guide"]:
            return latents, eps
        cond, full = self.cond, self.sample

        def unet(sample: Tensor, rows: Sequence[int]) -> Tensor:
            try:
                return self.unet_call(replace(ctx, rows=tuple(rows)), sample, timestep, cond.rows(rows))
            finally:
                self.ctx, self.sample, self.cond = ctx, full, cond

        for patch in self._with["guide"]:
            latents, eps = patch.guide(ctx, latents, eps, unet)
        return latents, eps

    def scheduler_step(self, ctx: StepContext, eps: Tensor, latents: Tensor,
                       default: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        steppers = self._with["scheduler_step"]
        return steppers[0].scheduler_step(ctx, eps, latents, default) if steppers else default(eps, latents)

    def after_step(self, ctx: StepContext, latents: Tensor) -> Tensor:
        for patch in self._with["after_step"]:
            latents = patch.after_step(ctx, latents)
        return latents

    # -- installing hooks -------------------------------------------------------------------
    def install(self, stack: ExitStack, mirrors: Sequence[nn.Module] = ()) -> None:
        """Hook the modules the batch's patches need, then each patch's `install`; `stack`
        undoes it all (in reverse order)."""
        for patch in self.patches:
            for layer, multiplier in patch.lora_layers():
                self._hook_lora(stack, layer, multiplier)
        if self._with["down_block_input"]:
            from library.sampling.entry_blocks import entry_blocks

            for model in (self.unet, *mirrors):  # SD 1.x/2.x: down_blocks; SDXL: its nine input blocks
                for depth, block in enumerate(entry_blocks(model)):
                    stack.callback(block.register_forward_pre_hook(self._down_hook(depth), with_kwargs=True).remove)
        if self._with["before_skip_concat"]:
            for index, block in enumerate(self.unet.up_blocks):
                _hook_skip_concats(stack, block, index, self._skip_concat)
        if self._with["cross_attention_states"] or self._with["cross_attention_output"]:
            from library.models.unet_blocks import cross_attention_modules

            for name, modules in cross_attention_modules(self.unet).items():
                for attn in modules:
                    _swap_processor(stack, attn, _PatchedCrossAttention(self, name, attn.processor))
        for patch in self._with["install"]:
            patch.install(stack, self)

    def tagged(self, tag: object, call: Callable[[], Tensor]) -> Tensor:
        """`call()` with `ctx.attention` = `tag` for the point calls inside it (`Attend`)."""
        outer = self.ctx
        self.ctx = replace(outer, attention=tag)
        try:
            return call()
        finally:
            self.ctx = outer

    def _modulate(self, lora: LoRALayer, x: Tensor, delta: Tensor) -> Tensor:
        for patch in self._with["lora_output"]:
            delta = patch.lora_output(self.ctx, lora, x, delta)
        return delta

    def _hook_lora(self, stack: ExitStack, layer: LoRALayer, multiplier: float) -> None:
        modulate = self._modulate if self._with["lora_output"] else None

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            return layer.add_output(module, x, output, multiplier, modulate)

        stack.callback(layer.module.register_forward_hook(hook, with_kwargs=True).remove)

    def _down_hook(self, depth: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for patch in self._with["down_block_input"]:
                hidden = patch.down_block_input(self.ctx, depth, hidden)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs
        return hook

    def _skip_concat(self, index: int, layer: int, hidden: Tensor, skip: Tensor) -> Tensor:
        for patch in self._with["before_skip_concat"]:
            hidden = patch.before_skip_concat(self.ctx, index, layer, hidden, skip)
        return hidden

    def _sigma(self, step: int) -> float | None:
        sigmas = getattr(self.batch.scheduler, "sigmas", None)
        if sigmas is None:
            return None
        return float(sigma_at(sigmas, step, getattr(self.batch.scheduler, "begin_index", None)))


_POINTS = [name for name in vars(Patch) if not name.startswith("_") and name not in ("lora_layers", "progress_label")]


def _add_kwargs(total: dict, extra: dict) -> dict:
    """U-Net keyword arguments of two producers: residual tensors (and tuples of them) add up."""
    merged = dict(total)
    for key, value in extra.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, (tuple, list)):
            merged[key] = tuple(a + b for a, b in zip(merged[key], value, strict=True))
        elif isinstance(value, Tensor):
            merged[key] = merged[key] + value
        else:
            raise ValueError(f"two patches set the U-Net argument {key!r}")
    return merged


def _swap_processor(stack: ExitStack, attn: nn.Module, processor) -> None:
    """Set `processor` on `attn` until `stack` closes (attribute set directly: `set_processor`
    also edits the module tree when a processor is an nn.Module, which a wrapper must not)."""
    original = attn.processor
    attn.processor = processor
    stack.callback(setattr, attn, "processor", original)


class _PatchedCrossAttention:
    """A cross-attention processor that runs the patches' text-state and output points."""

    def __init__(self, run: BatchRun, layer: str, inner) -> None:
        self.run, self.layer, self.inner = run, layer, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        run = self.run
        states = encoder_hidden_states
        for patch in run._with["cross_attention_states"]:
            states = patch.cross_attention_states(run.ctx, self.layer, states, run.cond)

        def attend(text: Tensor, tag: object | None = None) -> Tensor:
            def call() -> Tensor:
                return self.inner(attn, hidden_states, encoder_hidden_states=text, attention_mask=attention_mask,
                                  **kwargs)

            return call() if tag is None else run.tagged(tag, call)

        for patch in reversed(run._with["cross_attention_output"]):
            attend = _bound_output(patch, run, self.layer, hidden_states, attend)
        return attend(states)


def _bound_output(patch: Patch, run: BatchRun, layer: str, hidden: Tensor, inner: Attend) -> Attend:
    """`patch`'s output point around `inner`; a tag an outer patch gives reaches the attention."""
    def bound(states: Tensor, tag: object | None = None) -> Tensor:
        attend = inner if tag is None else functools.partial(inner, tag=tag)
        return patch.cross_attention_output(run.ctx, layer, hidden, states, attend)

    return bound


def _hook_skip_concats(stack: ExitStack, block: nn.Module, index: int,
                       change: Callable[[int, int, Tensor, Tensor], Tensor]) -> None:
    """Call `change(index, j, hidden, skip)` before up block `index` concatenates its j-th skip.

    diffusers' up blocks concatenate inside `forward`; the hidden state before concat 0 is
    the block's input, before concat j > 0 the output of layer j - 1 (its attention, or its
    resnet in blocks without attention). Skips are taken from the end of the block's tuple.
    """
    skips: list[Tensor] = []

    def before_block(module, args, kwargs):
        skips[:] = list(kwargs["res_hidden_states_tuple"])[::-1]
        hidden = change(index, 0, kwargs["hidden_states"], skips[0])
        return args, {**kwargs, "hidden_states": hidden}

    stack.callback(block.register_forward_pre_hook(before_block, with_kwargs=True).remove)
    attentions = list(getattr(block, "attentions", None) or [])
    for j in range(1, len(block.resnets)):
        previous = attentions[j - 1] if j - 1 < len(attentions) else block.resnets[j - 1]

        def after_layer(module, args, output, j=j):
            if isinstance(output, tuple):
                return (change(index, j, output[0], skips[j]), *output[1:])
            if isinstance(output, Tensor):
                return change(index, j, output, skips[j])
            output.sample = change(index, j, output.sample, skips[j])
            return output

        stack.callback(previous.register_forward_hook(after_layer).remove)
