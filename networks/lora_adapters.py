"""The weight deltas of the supported LoRA families, as merged weights and as bypass outputs.

Each adapter knows, for one target layer,

* ``delta()``: the full weight change ``ΔW`` (alpha/rank scaling included, multiplier not),
  shaped like the layer's weight;
* ``merged(W, m)``: the layer weight after applying the adapter with multiplier ``m``;
* ``bypass(module, x)``: the extra output ``merged(W, 1)(x) - W(x)`` computed without touching
  the weights (un-merged application). Plain LoRA does this with two small layers
  (``up(down(x))``); the other families apply the delta weight with the layer's own conv /
  linear settings.

``merged(W, m) - W`` is linear in ``m`` for every family (see ``DoRA`` below), so un-merged
output ``= base + m * bypass`` is exactly the merged result.

Formulas (written from the LoRA, LyCORIS and DoRA descriptions; see each class):

* LoRA / LoCon:  ``ΔW = alpha/rank * up @ down``  (conv: ``down`` is k x k, ``up`` 1x1;
  optional Tucker core ``mid``: ``down`` 1x1, ``mid`` k x k, ``up`` 1x1).
* LoHa:          ``ΔW = alpha/rank * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (Tucker cores optional).
* LoKr:          ``ΔW = s * kron(w1, w2)`` with ``w1 = w1_a @ w1_b`` or full, ``w2`` likewise
  (or Tucker ``t2``); ``s = alpha/rank`` if either factor is decomposed, else 1.
* Full diff:     ``ΔW = diff``.
* DoRA:          any of the above plus ``dora_scale`` (magnitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShapeMismatch(ValueError):
    """The factors do not fit the target layer (the LoRA is for another base model)."""


def _kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[2:])


def _tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Rebuild a conv weight from a Tucker core: W[p,r,...] = Σ core[i,j,...] L[i,p] R[j,r].

    LyCORIS stores the mode matrices as (rank, out) and (rank, in) in this case.
    """
    return torch.einsum("ij...,ip,jr->pr...", core, left, right)


def apply_layer(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """Run `module`'s linear / conv operation with another weight and no bias."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)
    return F.linear(x, weight)


@dataclass(eq=False)
class Adapter:
    """Base class: a delta for one layer of weight shape `shape`, plus optional DoRA."""

    shape: tuple[int, ...]
    alpha: float | None = None
    dora_scale: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    kind = "adapter"

    # -- to override -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """alpha / rank; a missing (or zero) alpha means alpha = rank, i.e. scale 1."""
        if self.alpha is None or self.alpha == 0:
            return 1.0
        return float(self.alpha) / self.rank

    def raw_delta(self, device: torch.device) -> Tensor:
        """Unscaled ΔW in fp32 on `device`, shaped like the layer weight."""
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """All factor tensors (for size accounting and device moves)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def delta(self, device: torch.device | str = "cpu") -> Tensor:
        """ΔW with alpha/rank applied, fp32, on `device`."""
        return self.raw_delta(torch.device(device)) * self.scale

    def merged(self, weight: Tensor, multiplier: float) -> Tensor:
        """The layer weight after this adapter at `multiplier` (fp32 in, fp32 out).

        DoRA: ``W_d = dora_scale * (W + ΔW) / ||W + ΔW||`` with the norm over every axis but
        the one `dora_scale` runs along, and ``W' = W + m (W_d - W)``: at ``m = 1`` the DoRA
        weight, at ``m = 0`` the base, linear in between. (LyCORIS interpolates the magnitude
        ratio instead; both agree at m = 1, ours keeps un-merged == merged for every m.)
        """
        delta = self.delta(weight.device)
        if self.dora_scale is None:
            return weight + multiplier * delta
        return weight + multiplier * (self._dora_weight(weight, delta) - weight)

    def apply_(self, source: Tensor, out: Tensor, multiplier: float) -> Tensor:
        """`merged(source, multiplier)`, written into `out` where the family allows.

        Additive families accept `source` / `out` in the layer's dtype (the sum is formed in
        fp32 and rounded once); DoRA needs fp32.

        Returns the result (`out`, or a new tensor for DoRA). `out` may be `source`. Additive
        families need no layer-sized temporaries for plain LoRA (one ``addmm`` pass), which
        keeps pre-calculation of a full-size U-Net cheap.
        """
        if self.dora_scale is not None:
            return self.merged(source, multiplier)
        self.add_delta_(source, out, multiplier * self.scale)
        return out

    def add_delta_(self, source: Tensor, out: Tensor, alpha: float) -> None:
        """``out = source + alpha * raw ΔW``."""
        torch.add(source, self.raw_delta(out.device), alpha=alpha, out=out)

    def _dora_weight(self, weight: Tensor, delta: Tensor) -> Tensor:
        direction = weight + delta
        scale = self.dora_scale.to(direction.device, torch.float32)
        eps = torch.finfo(direction.dtype).eps
        if dora_on_output_axis(scale, self.shape):
            norm = direction.reshape(direction.shape[0], -1).norm(dim=1)
            norm = norm.reshape(-1, *[1] * (direction.dim() - 1))
            scale = scale.reshape(norm.shape)
        else:
            norm = direction.transpose(0, 1).reshape(direction.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (direction.dim() - 2))
            scale = scale.reshape(norm.shape)
        return direction * (scale / (norm + eps))

    def bypass(self, module: nn.Module, x: Tensor) -> Tensor:
        """Extra output of the layer for input `x` at multiplier 1, weights untouched."""
        return apply_layer(module, x, self._bypass_weight(module, x.device, x.dtype))

    def add_bypass(self, module: nn.Module, x: Tensor, output: Tensor, multiplier: float) -> Tensor:
        """``output + multiplier * bypass(module, x)`` as a new tensor, in as few passes as possible."""
        return torch.add(output, self.bypass(module, x), alpha=multiplier)

    def prepare(self, module: nn.Module) -> None:
        """Build the un-merged caches for the layer's own device and dtype ahead of use."""
        self._bypass_weight(module, module.weight.device, module.weight.dtype)

    def _bypass_weight(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``merged(W, 1) - W`` in `dtype` on `device`, cached (DoRA: per weight version)."""
        weight = module.weight
        version: int | None = None
        if self.dora_scale is not None:  # DoRA depends on W itself: follow in-place changes
            try:
                version = weight._version
            except RuntimeError:  # inference tensors keep no version: never cache
                self._cache.pop("bypass", None)
                version = -1
        key = (device, dtype, version, id(weight) if version is not None else None)
        cached = self._cache.get("bypass")
        if cached is None or cached[0] != key or version == -1:
            w32 = weight.detach().to(torch.float32)
            diff = self.merged(w32, 1.0) - w32
            cached = (key, diff.to(device, dtype))
            self._cache["bypass"] = cached
        return cached[1]

    def clear_cache(self) -> None:
        """Drop cached converted factors / delta weights (they can be as big as the layer)."""
        self._cache.clear()

    def check_dora(self) -> None:
        if self.dora_scale is None:
            return
        dora_on_output_axis(self.dora_scale, self.shape)  # raises if it fits neither axis


def dora_on_output_axis(dora_scale: Tensor, shape: tuple[int, ...]) -> bool:
    """Which axis a DoRA magnitude runs along, decided from its shape.

    ``(out,)`` / ``(out, 1, ...)`` (PEFT, LyCORIS ``wd_on_output``) is per output channel;
    ``(1, in, ...)`` (older LyCORIS default) is per input channel. A leading dimension equal
    to the output count wins when both would fit (square layers with a 1-D vector).
    """
    n = dora_scale.numel()
    if dora_scale.dim() >= 1 and dora_scale.shape[0] == shape[0] and n == shape[0]:
        return True
    if n == shape[1]:
        return False
    raise ShapeMismatch(f"dora_scale {tuple(dora_scale.shape)}")


@dataclass(eq=False)
class LoRA(Adapter):
    """Classic LoRA / LoCon: ``ΔW = alpha/rank * up @ [mid] @ down``.

    `down` is (rank, in) for Linear or (rank, in, kh, kw) for conv, `up` (out, rank[, 1, 1]);
    rank is `down`'s output dimension. With a Tucker core `mid` (rank, rank, kh, kw), `down`
    and `up` are 1x1 and the kernel lives in `mid`.
    """

    down: Tensor = None  # type: ignore[assignment]
    up: Tensor = None  # type: ignore[assignment]
    mid: Tensor | None = None
    kind = "lora"

    def __post_init__(self) -> None:
        conv = len(self.shape) == 4
        if conv:  # 2-D factors of a 1x1 conv (diffusers layout) -> 4-D
            if self.down.dim() == 2:
                self.down = self.down[:, :, None, None]
            if self.up.dim() == 2:
                self.up = self.up[:, :, None, None]
        else:  # 1x1-conv factors on a Linear target -> 2-D
            if self.down.dim() == 4 and self.down.shape[2:] == (1, 1):
                self.down = self.down.flatten(1)
            if self.up.dim() == 4 and self.up.shape[2:] == (1, 1):
                self.up = self.up.flatten(1)
        if self.mid is not None and not conv:
            raise ShapeMismatch(f"lora_mid {tuple(self.mid.shape)} on a Linear layer")
        out, inp = self.shape[0], self.shape[1]
        kernel = _kernel(self.shape)
        ok = (
            self.up.shape[0] == out
            and self.down.shape[1] == inp
            and self.up.shape[1] == (self.mid.shape[0] if self.mid is not None else self.rank)
            and self.down.dim() == self.up.dim() == len(self.shape)
        )
        if ok and conv:
            if self.mid is not None:
                ok = tuple(self.mid.shape[2:]) == kernel and self.mid.shape[1] == self.rank
                ok = ok and self.down.shape[2:] == (1, 1)
            else:
                ok = tuple(self.down.shape[2:]) == kernel
            ok = ok and self.up.shape[2:] == (1, 1)
        if not ok:
            raise ShapeMismatch(f"lora_up {tuple(self.up.shape)} / lora_down {tuple(self.down.shape)}")
        self.check_dora()

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.down, self.up, self.mid, self.dora_scale) if t is not None]

    def raw_delta(self, device: torch.device) -> Tensor:
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32)
        if self.mid is not None:
            mid = self.mid.to(device, torch.float32)
            # ΔW[o,i,h,w] = Σ up[o,r] mid[r,s,h,w] down[s,i]
            return torch.einsum("or,rshw,si->oihw", up, mid, down.flatten(1))
        return (up @ down.flatten(1)).reshape(self.shape)

    def add_delta_(self, source: Tensor, out: Tensor, alpha: float) -> None:
        if self.mid is not None or not (out.is_contiguous() and source.is_contiguous()):
            return super().add_delta_(source, out, alpha)
        # factors in the weight's dtype: the GEMM accumulates in fp32 and rounds once
        up = self.up.to(out.device, out.dtype).flatten(1)
        down = self.down.to(out.device, out.dtype).flatten(1)
        rows = out.shape[0]
        torch.addmm(source.view(rows, -1), up, down, alpha=alpha, out=out.view(rows, -1))

    def prepare(self, module: nn.Module) -> None:
        if self.dora_scale is not None:
            return super().prepare(module)
        self._factors(module.weight.device, module.weight.dtype)

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """(down, up * scale, mid) in `dtype` on `device`, cached."""
        key = (device, dtype)
        cached = self._cache.get("factors")
        if cached is None or cached[0] != key:
            convert = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
            cached = (key, (convert(self.down), convert(self.up) * self.scale, convert(self.mid)))
            self._cache["factors"] = cached
        return cached[1]

    def bypass(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.dora_scale is not None:  # DoRA rescales the whole weight: use the delta path
            return super().bypass(module, x)
        down, up, mid = self._factors(x.device, x.dtype)
        if isinstance(module, nn.Conv2d):
            if mid is not None:
                return F.conv2d(module._conv_forward(F.conv2d(x, down), mid, None), up)
            return F.conv2d(module._conv_forward(x, down, None), up)
        return F.linear(F.linear(x, down), up)

    def add_bypass(self, module: nn.Module, x: Tensor, output: Tensor, multiplier: float) -> Tensor:
        """The up projection, the multiplier and the sum fused in one ``addmm`` / ``baddbmm``.

        Un-merged LoRA's cost beyond its two small matmuls is passes over the layer output
        (scale, add); fusing them keeps the un-merged overhead close to the matmul FLOPs.
        """
        if self.dora_scale is not None or self.mid is not None or not output.is_contiguous():
            return super().add_bypass(module, x, output, multiplier)
        down, up, _ = self._factors(x.device, x.dtype)
        if isinstance(module, nn.Conv2d):
            h = module._conv_forward(x, down, None)  # (N, rank, H, W)
            n = h.shape[0]
            up2d = up.flatten(1).expand(n, -1, -1)
            fused = torch.baddbmm(output.flatten(2), up2d, h.flatten(2), alpha=multiplier)
            return fused.view(output.shape)
        h = F.linear(x, down)
        fused = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=multiplier)
        return fused.view(output.shape)


@dataclass(eq=False)
class LoHa(Adapter):
    """LoHa (LyCORIS): ``ΔW = alpha/rank * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``.

    Without Tucker cores ``w*_a`` is (out, rank) and ``w*_b`` (rank, in*kh*kw); with cores
    ``t1``/``t2`` (rank, rank, kh, kw) each Hadamard factor is rebuilt as
    ``Σ t[i,j] w_a[i,:] w_b[j,:]`` (``w_a`` (rank, out), ``w_b`` (rank, in)).
    Rank is ``w1_b``'s first dimension.
    """

    w1_a: Tensor = None  # type: ignore[assignment]
    w1_b: Tensor = None  # type: ignore[assignment]
    w2_a: Tensor = None  # type: ignore[assignment]
    w2_b: Tensor = None  # type: ignore[assignment]
    t1: Tensor | None = None
    t2: Tensor | None = None
    kind = "loha"

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        for a, b, t in ((self.w1_a, self.w1_b, self.t1), (self.w2_a, self.w2_b, self.t2)):
            if t is not None:
                rebuilt = (a.shape[1], b.shape[1], *t.shape[2:])
            else:
                rebuilt = (a.shape[0], b.shape[1])
            if rebuilt[0] != self.shape[0] or math.prod(rebuilt) != numel:
                raise ShapeMismatch(f"hada_w_a {tuple(a.shape)} / hada_w_b {tuple(b.shape)}")
        self.check_dora()

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def tensors(self) -> list[Tensor]:
        names = (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2, self.dora_scale)
        return [t for t in names if t is not None]

    def raw_delta(self, device: torch.device) -> Tensor:
        def factor(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
            a, b = a.to(device, torch.float32), b.to(device, torch.float32)
            if t is not None:
                return _tucker(t.to(device, torch.float32), a, b)
            return a @ b

        w1 = factor(self.w1_a, self.w1_b, self.t1).reshape(self.shape)
        w2 = factor(self.w2_a, self.w2_b, self.t2).reshape(self.shape)
        return w1 * w2


@dataclass(eq=False)
class LoKr(Adapter):
    """LoKr (LyCORIS): ``ΔW = s * kron(w1, w2)`` reshaped to the layer weight.

    ``w1`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2``,
    ``lokr_w2_a @ lokr_w2_b`` or, with a Tucker core, ``Σ t2[i,j] w2_a[i,:] w2_b[j,:]``.
    Reading of the LyCORIS implementation: when both factors are full matrices the scale is 1
    (alpha is ignored, nothing was decomposed); otherwise ``s = alpha / rank`` with rank the
    inner dimension of a decomposed factor (``w1_b`` first, else ``w2_b``), missing alpha
    meaning ``s = 1``. For conv layers, the 2-D ``w1`` (out1, in1) is Kronecker-multiplied
    with ``w2`` flattened to (out2, in2*kh*kw), which equals the 4-D product.
    """

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    kind = "lokr"

    def __post_init__(self) -> None:
        if (self.w1 is None and (self.w1_a is None or self.w1_b is None)) or (
            self.w2 is None and (self.w2_a is None or self.w2_b is None)
        ):
            raise ShapeMismatch("incomplete LoKr factors")
        o1, i1 = self._w1_shape()
        o2, rest2 = self._w2_shape()
        if o1 * o2 != self.shape[0] or i1 * rest2 != math.prod(self.shape[1:]):
            raise ShapeMismatch(f"kron({o1}x{i1}, {o2}x{rest2})")
        self.check_dora()

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return self.w1.shape[0], math.prod(self.w1.shape[1:])
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def _w2_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return self.w2.shape[0], math.prod(self.w2.shape[1:])
        if self.t2 is not None:
            return self.w2_a.shape[1], self.w2_b.shape[1] * math.prod(self.t2.shape[2:])
        return self.w2_a.shape[0], self.w2_b.shape[1]

    @property
    def decomposed(self) -> bool:
        return self.w1 is None or self.w2 is None

    @property
    def rank(self) -> int:
        if self.w1 is None:
            return self.w1_b.shape[0]
        if self.w2 is None:
            return self.w2_b.shape[0]
        return 1

    @property
    def scale(self) -> float:
        if not self.decomposed:
            return 1.0
        return super().scale

    def tensors(self) -> list[Tensor]:
        names = (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2, self.dora_scale)
        return [t for t in names if t is not None]

    def raw_delta(self, device: torch.device) -> Tensor:
        f = lambda t: t.to(device, torch.float32)  # noqa: E731
        w1 = f(self.w1) if self.w1 is not None else f(self.w1_a) @ f(self.w1_b)
        if self.w2 is not None:
            w2 = f(self.w2)
        elif self.t2 is not None:
            w2 = _tucker(f(self.t2), f(self.w2_a), f(self.w2_b))
        else:
            w2 = f(self.w2_a) @ f(self.w2_b)
        return torch.kron(w1.flatten(1), w2.flatten(1)).reshape(self.shape)


@dataclass(eq=False)
class FullDiff(Adapter):
    """LyCORIS "full" / kohya ``diff``: the stored tensor is ΔW itself (scale 1)."""

    diff: Tensor = None  # type: ignore[assignment]
    kind = "full"

    def __post_init__(self) -> None:
        if self.diff.numel() != math.prod(self.shape) or self.diff.shape[0] != self.shape[0]:
            raise ShapeMismatch(f"diff {tuple(self.diff.shape)}")
        self.check_dora()

    @property
    def rank(self) -> int:
        return 1

    @property
    def scale(self) -> float:
        return 1.0

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.diff, self.dora_scale) if t is not None]

    def raw_delta(self, device: torch.device) -> Tensor:
        return self.diff.to(device, torch.float32).reshape(self.shape)
