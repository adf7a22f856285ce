"""Gradual Latent's settings: what the command line and prompt lines ask for, checked.

Separate from the feature (`library.features.gradual_latent`) so that parsing and checking options
imports no torch: a bad option is reported in a fraction of a second. The semantics of each
field are in `library.features.gradual_latent`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from library.errors import UserError

if TYPE_CHECKING:
    import torch

SAMPLERS = ("euler_a", "k_euler_a")
PROMPT_DEFAULT_TIMESTEPS = 650  # a prompt that sets --glr/--gls/--gle/--glsn/--glus without --glt


@dataclass(frozen=True)
class Unsharp:
    """`--gradual_latent_unsharp_params ksize,sigma,strength[,target_x]`."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x + strength * (x - gaussian_blur(x))``: depthwise, reflect padding, normalised taps."""
        import torch
        import torch.nn.functional as F

        j = torch.arange(self.ksize, dtype=x.dtype, device=x.device) - (self.ksize - 1) / 2
        taps = torch.exp(-0.5 * (j / self.sigma) ** 2)
        taps = taps / taps.sum()
        kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, self.ksize, self.ksize)
        pad = self.ksize // 2
        blurred = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])
        return x + self.strength * (x - blurred)


MAX_KSIZE = 31  # a larger blur kernel than any latent side Gradual Latent starts from at 512 px and ratio 0.5


def parse_unsharp(text: str | None, option: str = "--gradual_latent_unsharp_params") -> Unsharp | None:
    """``"3,0.5,0.5[,1]"`` -> Unsharp (ksize odd, 1 to `MAX_KSIZE`; sigma above 0 and strength
    finite; target_x 1 when left out)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    example = f'(e.g. {option} "3,0.5,0.5,1")'
    if len(parts) not in (3, 4):
        raise UserError(f'{option} "{text}": expected ksize,sigma,strength[,target_x] {example}')
    try:
        size, sigma, strength = float(parts[0]), float(parts[1]), float(parts[2])
        target_x = bool(int(parts[3])) if len(parts) == 4 else True
    except ValueError:
        raise UserError(f'{option} "{text}": expected numbers {example}') from None
    if not (math.isfinite(size) and size.is_integer() and 1 <= size <= MAX_KSIZE and size % 2 == 1):
        raise UserError(f'{option} "{text}": ksize must be an odd whole number from 1 to {MAX_KSIZE} {example}')
    if not (math.isfinite(sigma) and sigma > 0) or not math.isfinite(strength):
        raise UserError(f'{option} "{text}": sigma must be above 0 and strength a finite number {example}')
    return Unsharp(int(size), sigma, strength, target_x)


@dataclass(frozen=True)
class GradualLatent:
    """One image's Gradual Latent settings."""

    timesteps: int
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Unsharp | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1 or not self.ratio_step > 0 or self.every_n_steps < 1:
            raise UserError(f"Gradual Latent: ratio {self.ratio} must be in (0, 1], ratio step {self.ratio_step} "
                            f"above 0, every-n-steps {self.every_n_steps} at least 1")

    def check_size(self, width: int, height: int, vae_scale: int = 8) -> None:
        """The latent Gradual Latent starts from has at least 1 pixel a side, and more than half
        the unsharp kernel (its reflect padding needs that); else a `UserError`."""
        start = [math.floor(side // vae_scale * self.ratio) for side in (height, width)]
        if min(start) < 1:
            raise UserError(f"Gradual Latent: a {width}x{height} image is too small to start at ratio {self.ratio:g}")
        if self.unsharp is not None and self.unsharp.ksize // 2 >= min(start):
            largest = 2 * min(start) - 1
            raise UserError(f"Gradual Latent: the unsharp kernel {self.unsharp.ksize} is larger than the "
                            f"{start[1]}x{start[0]} latent it sharpens (a {width}x{height} image at ratio "
                            f"{self.ratio:g}); use a kernel of at most {largest}")

    def sizes(self, timesteps: list[int], height: int,
              width: int) -> tuple[tuple[int, int], dict[int, tuple[int, int]]]:
        """The starting size and {step index: size of that step's result} for a latent of (height, width)."""
        start = (math.floor(height * self.ratio), math.floor(width * self.ratio))
        ratio, elapsed, resizes, size = self.ratio, 1000, {}, start
        for i, t in enumerate(timesteps):
            if t < self.timesteps and ratio < 1.0 and elapsed >= self.every_n_steps:
                ratio = min(ratio + self.ratio_step, 1.0)
                small = (int(height * ratio) // 8 * 8, int(width * ratio) // 8 * 8)
                rounded = (height, width) if ratio >= 1.0 else small
                size = resizes[i] = (max(rounded[0], size[0]), max(rounded[1], size[1]))  # never smaller
                elapsed = 0
            elapsed += 1
        return start, resizes


def with_overrides(base: GradualLatent | None, overrides, prompt_unsharp: Unsharp | None) -> GradualLatent | None:
    """A prompt line's settings: its `--glt --glr --gls --gle --glsn --glus` over the command line's."""
    o = overrides
    others = [o.gradual_latent_ratio, o.gradual_latent_ratio_step, o.gradual_latent_every_n_steps,
              o.gradual_latent_s_noise, prompt_unsharp]
    if o.gradual_latent_timesteps is None and all(v is None for v in others):
        return base
    start = base or GradualLatent(PROMPT_DEFAULT_TIMESTEPS)
    pick = lambda given, default: default if given is None else given  # noqa: E731
    return GradualLatent(
        timesteps=pick(o.gradual_latent_timesteps, start.timesteps),
        ratio=pick(o.gradual_latent_ratio, start.ratio),
        ratio_step=pick(o.gradual_latent_ratio_step, start.ratio_step),
        every_n_steps=pick(o.gradual_latent_every_n_steps, start.every_n_steps),
        s_noise=pick(o.gradual_latent_s_noise, start.s_noise),
        unsharp=pick(prompt_unsharp, start.unsharp),
    )
