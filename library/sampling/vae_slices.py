"""VAE decode/encode in horizontal slices (`--vae_slices N`) with the one-piece result.

Why not simply cut the latent into bands and decode each? Two parts of an SD VAE see the
whole image: the attention in the mid block (every position attends to every other one)
and each GroupNorm (mean and variance are taken over the whole image). Bands decoded on
their own get other statistics and other attention, and show seams. diffusers'
`enable_tiling` (our `--vae_tiling`) accepts that and blends overlapping tiles; this module
keeps the result equal to the one-piece decode instead. It is written for this project.

How:

* The mid block (attention included) runs in one piece at latent resolution, where it is
  small (1/64 of the pixels). Only the full-resolution part is sliced: the decoder's up
  blocks and output layers, the encoder's input conv and down blocks.
* Bands are *streamed*: each 3x3 convolution keeps the last rows of the previous band (a
  line buffer) and emits a row once the rows below it have arrived, so every row is
  computed once, from the same inputs as in one piece (no overlap to recompute, no seam).
  Residual branches are re-aligned with a row FIFO.
* GroupNorm needs its input's statistics before it can emit anything. The layers are cut
  into *segments*, each ending with one resnet block (its output kept as one tensor: the
  only full-size feature maps that exist at a time are a segment's input and output).
  A segment runs in passes over its input bands: a pass streams up to the first GroupNorm
  whose statistics are unknown and only measures its input (exactly, merging per-band
  mean/variance); the next pass uses them and goes one GroupNorm further; the last pass
  writes the segment's output. Upsampling (decoder) starts a segment, so the 4x larger
  upsampled map is never stored; downsampling (encoder) ends one.

Cost: the first conv of each resnet runs twice and each upsampling conv three times, and
band-sized convolutions are less efficient: 1.5x (encode) to 3x (decode) the time of one
piece, measured. Memory: two feature maps of one resnet level plus a band of each layer,
instead of several full feature maps and their temporaries (a third of the working memory
at 1024x1024; the numbers are in docs/img2img.md, from `python -m tools.bench vae-memory`). A
segment that keeps the shape writes its output over its input, rows already consumed. Only the standard SD structure
(ResnetBlock2D, nearest-upsampling Upsample2D, Downsample2D, GroupNorm) is streamed; any
other VAE is processed in one piece with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Rows = torch.Tensor | None  # (B, C, rows, W), or None when a stream has nothing to emit yet


class Unsupported(Exception):
    """The VAE has a layer the streaming code does not know; process it in one piece."""


def _cat(a: Rows, b: Rows) -> Rows:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=2)


# ----------------------------------------------------------------------------- row streams


class _Stream:
    """A layer applied to an image arriving in bands of rows, top to bottom."""

    dead = False  # True: ends at a GroupNorm that only measures; it never emits

    def push(self, x: Rows) -> Rows:
        raise NotImplementedError

    def flush(self) -> Rows:
        """Emit what is still held back once the last rows have been pushed."""
        return None

    def rows(self, n: int) -> int:
        """Rows emitted in all for `n` input rows."""
        return n


class _Map(_Stream):
    """A row-local function (activation, 1x1 conv, nearest upsampling by `factor`)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], factor: int = 1) -> None:
        self.fn, self.factor = fn, factor

    def push(self, x: Rows) -> Rows:
        return None if x is None else self.fn(x)

    def rows(self, n: int) -> int:
        return n * self.factor


class _Conv(_Stream):
    """A 2D convolution with a line buffer: exact rows, each computed once."""

    def __init__(self, conv: torch.nn.Conv2d, pad_rows: tuple[int, int], pad_cols: tuple[int, int]) -> None:
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise Unsupported(f"convolution {conv}")
        self.conv = conv
        self.k, self.stride = conv.kernel_size[0], conv.stride[0]
        self.pad_rows, self.pad_cols = pad_rows, pad_cols
        self.buffer: Rows = None
        self.started = False

    @classmethod
    def symmetric(cls, conv: torch.nn.Conv2d) -> _Conv:
        """A conv with its own zero padding on all sides."""
        pad_h, pad_w = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
        return cls(conv, (pad_h, pad_h), (pad_w, pad_w))

    @staticmethod
    def _zeros(like: torch.Tensor, rows: int) -> torch.Tensor:
        return like.new_zeros(like.shape[0], like.shape[1], rows, like.shape[3])

    def push(self, x: Rows) -> Rows:
        if x is None:
            return None
        if not self.started:
            self.started = True
            x = _cat(self._zeros(x, self.pad_rows[0]), x) if self.pad_rows[0] else x
        return self._emit(_cat(self.buffer, x))

    def flush(self) -> Rows:
        if self.buffer is None:
            return None
        tail = self._zeros(self.buffer, self.pad_rows[1]) if self.pad_rows[1] else None
        out = self._emit(_cat(self.buffer, tail))
        self.buffer = None
        return out

    def rows(self, n: int) -> int:
        return (n + sum(self.pad_rows) - self.k) // self.stride + 1

    def _emit(self, rows: torch.Tensor) -> Rows:
        available = rows.shape[2]
        if available < self.k:
            self.buffer = rows
            return None
        count = (available - self.k) // self.stride + 1
        used = rows[:, :, : (count - 1) * self.stride + self.k]
        left, right = self.pad_cols
        if left != right:  # asymmetric (SD's downsampler): pad explicitly
            used, left = F.pad(used, (left, right, 0, 0)), 0
        out = F.conv2d(used, self.conv.weight, self.conv.bias, stride=self.conv.stride, padding=(0, left))
        self.buffer = rows[:, :, count * self.stride :].clone()  # keep a few rows, not the band
        return out


@dataclass
class GroupStats:
    """Per-sample, per-group mean and (biased) variance, combinable across bands."""

    count: int
    mean: torch.Tensor  # (B, G) float64
    var: torch.Tensor  # (B, G) float64

    def merge(self, other: GroupStats) -> GroupStats:
        """Chan et al.'s parallel combination (stable, unlike sums of squares)."""
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.var * self.count + other.var * other.count + delta**2 * (self.count * other.count / total)
        return GroupStats(total, mean, m2 / total)


class _Norm(_Stream):
    """GroupNorm with whole-image statistics: applies known ones, or only measures."""

    def __init__(self, norm: torch.nn.Module, stats: GroupStats | None) -> None:
        if not isinstance(norm, torch.nn.GroupNorm):
            raise Unsupported(f"normalization {type(norm).__name__}")
        self.norm, self.stats = norm, stats
        self.measured: GroupStats | None = None
        self.dead = stats is None

    def push(self, x: Rows) -> Rows:
        if x is None:
            return None
        if self.stats is None:
            self._measure(x)
            return None
        b, c = x.shape[:2]
        repeat = c // self.norm.num_groups
        scale = (self.stats.var + self.norm.eps).rsqrt().repeat_interleave(repeat, dim=1)  # (B, C)
        shift = -self.stats.mean.repeat_interleave(repeat, dim=1) * scale
        if self.norm.affine:
            weight, bias = self.norm.weight.double(), self.norm.bias.double()
            scale, shift = scale * weight, shift * weight + bias
        out = torch.addcmul(shift.float()[:, :, None, None], x.float(), scale.float()[:, :, None, None])
        return out.to(x.dtype)

    def _measure(self, x: torch.Tensor) -> None:
        grouped = x.reshape(x.shape[0], self.norm.num_groups, -1).float()
        var, mean = torch.var_mean(grouped, dim=2, correction=0)
        band = GroupStats(grouped.shape[2], mean.double(), var.double())
        self.measured = band if self.measured is None else self.measured.merge(band)


class _Chain(_Stream):
    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams
        self.dead = any(s.dead for s in streams)

    def push(self, x: Rows) -> Rows:
        for stream in self.streams:
            x = stream.push(x)
        return x

    def flush(self) -> Rows:
        x: Rows = None
        for stream in self.streams:
            x = _cat(stream.push(x), stream.flush())
        return x

    def rows(self, n: int) -> int:
        for stream in self.streams:
            n = stream.rows(n)
        return n


class _Residual(_Stream):
    """`(shortcut(x) + main(x)) / scale`, the main branch lagging behind by some rows."""

    def __init__(self, main: _Stream, shortcut: _Stream, scale: float) -> None:
        self.main, self.shortcut, self.scale = main, shortcut, scale
        self.pending: Rows = None
        self.dead = main.dead

    def _join(self, short: Rows, main: Rows) -> Rows:
        self.pending = _cat(self.pending, short)
        if main is None:
            return None
        rows = main.shape[2]
        out = self.pending[:, :, :rows] + main
        self.pending = self.pending[:, :, rows:].clone()
        return out / self.scale if self.scale != 1 else out

    def push(self, x: Rows) -> Rows:
        if self.dead:  # measuring inside the main branch: nothing to add to
            return self.main.push(x)
        return self._join(self.shortcut.push(x), self.main.push(x))

    def flush(self) -> Rows:
        if self.dead:
            return self.main.flush()
        return self._join(self.shortcut.flush(), self.main.flush())


# ----------------------------------------------------------------------------- VAE structure

Unit = tuple[str, object]  # ("resnet" | "up" | "down" | "conv" | "norm" | "act", module)


def _check_resnet(block: torch.nn.Module) -> None:
    if type(block).__name__ != "ResnetBlock2D" or block.upsample is not None or block.downsample is not None:
        raise Unsupported(f"block {type(block).__name__}")
    if block.time_emb_proj is not None:
        raise Unsupported("resnet block with a time embedding")
    for norm in (block.norm1, block.norm2):
        if not isinstance(norm, torch.nn.GroupNorm):
            raise Unsupported(f"normalization {type(norm).__name__}")


def _check_up(up: torch.nn.Module) -> None:
    if type(up).__name__ != "Upsample2D" or up.use_conv_transpose or up.norm is not None or not up.interpolate:
        raise Unsupported(f"upsampler {type(up).__name__}")


def _check_down(down: torch.nn.Module) -> None:
    if type(down).__name__ != "Downsample2D" or not down.use_conv or getattr(down, "norm", None) is not None:
        raise Unsupported(f"downsampler {type(down).__name__}")


def decoder_units(decoder: torch.nn.Module) -> list[Unit]:
    """The decoder's layers after the mid block, checked to be streamable."""
    units: list[Unit] = []
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            _check_resnet(resnet)
            units.append(("resnet", resnet))
        for up in block.upsamplers or []:
            _check_up(up)
            units.append(("up", up))
    if not isinstance(decoder.conv_norm_out, torch.nn.GroupNorm):
        raise Unsupported(f"output norm {type(decoder.conv_norm_out).__name__}")
    return units + [("norm", decoder.conv_norm_out), ("act", decoder.conv_act), ("conv", decoder.conv_out)]


def encoder_units(encoder: torch.nn.Module) -> list[Unit]:
    """The encoder's layers before the mid block, checked to be streamable."""
    units: list[Unit] = [("conv", encoder.conv_in)]
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            _check_resnet(resnet)
            units.append(("resnet", resnet))
        for down in block.downsamplers or []:
            _check_down(down)
            units.append(("down", down))
    return units


def segments(units: list[Unit]) -> list[list[Unit]]:
    """Cut after each resnet block (and the downsampler that follows it, if any)."""
    result: list[list[Unit]] = []
    current: list[Unit] = []
    for kind, module in units:
        if current and current[-1][0] in ("resnet", "down") and kind != "down":
            result.append(current)
            current = []
        current.append((kind, module))
    return result + [current] if current else result


class _Builder:
    """Builds the streams of one segment for one pass: norms after the known ones are
    not reached (the first unknown one measures and ends the pass)."""

    def __init__(self, stats: list[GroupStats]) -> None:
        self.stats = stats
        self.norms: list[_Norm] = []

    def norm(self, module: torch.nn.Module) -> _Norm:
        index = len(self.norms)
        stream = _Norm(module, self.stats[index] if index < len(self.stats) else None)
        self.norms.append(stream)
        return stream

    @property
    def probe(self) -> _Norm | None:
        return next((n for n in self.norms if n.stats is None), None)

    def resnet(self, block: torch.nn.Module) -> _Residual:
        main = _Chain([
            self.norm(block.norm1), _Map(block.nonlinearity), _Conv.symmetric(block.conv1),
            self.norm(block.norm2), _Map(block.nonlinearity), _Conv.symmetric(block.conv2),
        ])
        shortcut = _Map(block.conv_shortcut) if block.conv_shortcut is not None else _Map(lambda x: x)
        return _Residual(main, shortcut, block.output_scale_factor)

    def unit(self, kind: str, module) -> list[_Stream]:
        if kind == "resnet":
            return [self.resnet(module)]
        if kind == "up":
            nearest = _Map(lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), factor=2)
            return [nearest, _Conv.symmetric(module.conv)] if module.use_conv else [nearest]
        if kind == "down" and module.padding == 0:  # SD: pad right and bottom by one, stride 2
            return [_Conv(module.conv, (0, 1), (0, 1))]
        if kind == "down":
            return [_Conv.symmetric(module.conv)]
        if kind == "norm":
            return [self.norm(module)]
        if kind == "act":
            return [_Map(module)]
        return [_Conv.symmetric(module)]

    def chain(self, units: list[Unit]) -> _Chain:
        streams: list[_Stream] = []
        for kind, module in units:
            streams += self.unit(kind, module)
            if streams[-1].dead:
                break
        return _Chain(streams)


def _bands(x: torch.Tensor, slices: int) -> list[torch.Tensor]:
    return list(x.split(max(1, math.ceil(x.shape[2] / slices)), dim=2))


def _stream_into(chain: _Chain, x: torch.Tensor, slices: int, out: Rows = None) -> Rows:
    """Push `x` band by band through `chain`, writing what it emits into one tensor.

    `out` may be `x` itself when the chain keeps the shape: a row is emitted only after
    every input row it depends on was pushed, and the streams keep copies of the rows
    they hold back, so rows written are never read again.
    """
    row = 0
    for part in _emissions(chain, x, slices):
        if part is None:
            continue
        if out is None:
            out = part.new_empty(part.shape[0], part.shape[1], chain.rows(x.shape[2]), part.shape[3])
        out[:, :, row : row + part.shape[2]] = part
        row += part.shape[2]
    return out


def _emissions(chain: _Chain, x: torch.Tensor, slices: int):
    for band in _bands(x, slices):
        yield chain.push(band)
    yield chain.flush()


def _keeps_shape(segment: list[Unit]) -> bool:
    return len(segment) == 1 and segment[0][0] == "resnet" and segment[0][1].conv_shortcut is None


def run_segment(units: list[Unit], x: torch.Tensor, slices: int, in_place: bool = False) -> torch.Tensor:
    """One segment over `x` in bands: one measuring pass per GroupNorm, then the output
    (written over `x` when `in_place` and the segment keeps the shape)."""
    stats: list[GroupStats] = []
    while True:
        builder = _Builder(stats)
        chain = builder.chain(units)
        probe = builder.probe
        out = x if probe is None and in_place and _keeps_shape(units) else None
        out = _stream_into(chain, x, slices, out)
        if probe is None:
            return out
        stats.append(probe.measured)


def run_units(units: list[Unit], x: torch.Tensor, slices: int) -> torch.Tensor:
    """All segments in turn; only a segment's input and output exist in full at a time
    (the caller's `x` is never written to)."""
    for index, segment in enumerate(segments(units)):
        x = run_segment(segment, x, slices, in_place=index > 0)
    return x


# ----------------------------------------------------------------------------- public API


def sliced_decode(vae: torch.nn.Module, latents: torch.Tensor, slices: int) -> torch.Tensor:
    """`vae.decode(latents).sample`, computed in `slices` horizontal bands (same result)."""
    try:
        decoder = vae.decoder
        units = decoder_units(decoder)
    except (Unsupported, AttributeError) as exc:
        logger.warning("--vae_slices: this VAE cannot be sliced (%s); decoding in one piece", exc)
        return vae.decode(latents).sample
    z = vae.post_quant_conv(latents) if getattr(vae, "post_quant_conv", None) is not None else latents
    hidden = decoder.mid_block(decoder.conv_in(z), None)
    return run_units(units, hidden, slices)


def sliced_encode_moments(vae: torch.nn.Module, images: torch.Tensor, slices: int) -> torch.Tensor:
    """The encoder's moments (mean and log-variance, as `latent_dist.parameters`), in bands."""
    from library.models.lazy_encoder import loaded_encoder

    try:
        encoder = loaded_encoder(vae)
        units = encoder_units(encoder)
    except (Unsupported, AttributeError) as exc:
        logger.warning("--vae_slices: this VAE cannot be sliced (%s); encoding in one piece", exc)
        return vae.encode(images).latent_dist.parameters
    hidden = encoder.mid_block(run_units(units, images, slices))
    hidden = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(hidden)))
    return vae.quant_conv(hidden) if getattr(vae, "quant_conv", None) is not None else hidden
