"""The original's `--noise_offset_prob/--noise_offset_range` and
`--pyramid_noise_prob/--pyramid_noise_discount_range`: changes to an image's start noise.

The original decides both with Python's unseeded global `random`, so its images cannot be made
again. Ours draws every decision and value from the image's own noise stream (its
`torch.Generator`, after the up-front draws (1)-(3) of `library.prompts.seeds`), so a seed gives the
same image every time; with the options off nothing is drawn and images are unchanged.

Per image, in this order:
1. pyramid noise, when `rand() < pyramid_prob`: discount `d = min + rand() * (max - min)`; up to
   6 levels i = 1..5 add `bilinear_upsample(randn(C, h/r^i, w/r^i)) * d^i` with `r = 2 + 2 * rand()`
   drawn per level, stopping at a 1-pixel side; then the noise is scaled to unit std
   (multi-resolution noise, as the original's training-side `pyramid_noise_like`);
2. noise offset, when `rand() < offset_prob`: `o = min + randn() * (max - min)` (the original's
   formula) added to every element of the start noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PYRAMID_LEVELS = 6


@dataclass(frozen=True)
class StartNoise:
    """The run's start-noise changes (probabilities None or 0: off)."""

    offset_prob: float | None = None
    offset_range: tuple[float, float] | None = None
    pyramid_prob: float | None = None
    pyramid_range: tuple[float, float] | None = None

    @property
    def active(self) -> bool:
        return bool(self.offset_prob) or bool(self.pyramid_prob)

    def __call__(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`noise` (C, h, w) of one image, changed with draws from its `generator`."""
        if self.pyramid_prob and _rand(generator) < self.pyramid_prob:
            low, high = self.pyramid_range
            noise = pyramid(noise, low + _rand(generator) * (high - low), generator)
        if self.offset_prob and _rand(generator) < self.offset_prob:
            low, high = self.offset_range
            offset = low + float(torch.randn(1, generator=generator, device=generator.device)) * (high - low)
            noise = noise + offset
        return noise


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device))


def pyramid(noise: torch.Tensor, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise: `noise` plus upsampled coarser noises weighted discount^level."""
    channels, height, width = noise.shape
    out = noise.float().clone()
    for level in range(1, PYRAMID_LEVELS):
        ratio = 2 + 2 * _rand(generator)
        h, w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((1, channels, h, w), generator=generator, device=generator.device)
        out += F.interpolate(coarse.to(out.device), size=(height, width), mode="bilinear")[0] * discount**level
        if h == 1 or w == 1:
            break
    return (out / out.std()).to(noise.dtype)
