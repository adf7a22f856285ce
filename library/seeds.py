"""Seeds and per-image noise streams: the part of the contract users rely on most.

Per-image seeds (decided up front, in order, by `SeedSource`), as the original tool:
with `--seed S` and a single prompt making a single image, that image has seed S;
otherwise seeds come from `random.Random(S).randint(0, 2**32 - 1)` (an unseeded
`random.Random()` without `--seed`); `--d` seeds override per image (when they run out the
last one repeats); `--iter_same_seed` draws one seed per `--n_iter` round.

Each image owns one random stream (`torch.Generator` on the noise device, seeded with the
image's seed, which yields exactly what `torch.manual_seed(seed)` makes the global stream
yield). From it, in this order: (1) the initial latent noise; (2) steps x noises-per-step
latent-shaped noises, which the original draws up front and never uses (drawn anyway, the
later draws depend on them); (3) for img2img, the noise added to the source latent; (4) for
img2img, the VAE posterior sample; (5) every noise an ancestral sampler asks for. Because no
stream is shared, an image never depends on its batch mates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


class SeedSource:
    """The run's seed generator (`seed_random` in the original)."""

    def __init__(self, seed: int | None, single_image: bool, unseeded: int | None = None) -> None:
        """`unseeded`: what seeds the draws without `--seed` (a split run's shared random seed);
        None: fresh entropy, as the original."""
        self._fixed = seed if (seed is not None and single_image) else None
        self._random = random.Random(seed if seed is not None else unseeded)

    @property
    def random(self) -> random.Random:
        """The underlying `random.Random` (what the original hands `--from_module` prompters)."""
        return self._random

    def draw(self) -> int:
        """The next seed: the fixed one for a single-image run, else the next random draw."""
        if self._fixed is not None:
            return self._fixed
        return self._random.randint(0, 2**32 - 1)


def seeds_for_line(
    source: SeedSource, count: int, given: list[int] | None, iter_seed: int | None
) -> list[int]:
    """Seeds of the `count` images of one prompt line (`--d` values first, as the original)."""
    seeds: list[int] = []
    pending = list(given) if given is not None else None
    previous: int | None = None
    for _ in range(count):
        if pending is not None:
            seed = pending.pop(0) if pending else previous
        else:
            seed = iter_seed
        if seed is None:
            seed = source.draw()
        seeds.append(seed)
        previous = seed
    return seeds


@dataclass
class ImageNoise:
    """The noise of one batch: per-image generators and the up-front draws (1)-(3)."""

    generators: list[torch.Generator]
    initial: torch.Tensor  # (B, C, h, w): draw (1) of each image
    img2img: torch.Tensor | None  # (B, C, h, w): draw (3), or None for txt2img


def draw_image_noise(
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    *,
    steps: int,
    noises_per_step: int,
    img2img: bool,
    device: torch.device,
    dtype: torch.dtype,
    modify: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> ImageNoise:
    """Seed one generator per image and make its up-front draws in the original's order;
    `modify` (`library.start_noise`) then changes each start noise with draws from its stream."""
    import torch  # here, not at the top: prompt files are read and checked before torch loads

    generators, initial, extra = [], [], []
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(seed)
        initial.append(torch.randn(latent_shape, generator=g, device=device, dtype=dtype))
        for _ in range(steps * noises_per_step):  # drawn and unused, as the original
            torch.randn(latent_shape, generator=g, device=device, dtype=dtype)
        if img2img:
            extra.append(torch.randn(latent_shape, generator=g, device=device, dtype=dtype))
        if modify is not None:
            initial[-1] = modify(initial[-1], g)
        generators.append(g)
    return ImageNoise(generators, torch.stack(initial), torch.stack(extra) if img2img else None)
