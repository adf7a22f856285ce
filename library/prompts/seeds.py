"""Per-image seeds: the part of the contract users rely on most.

Per-image seeds (decided up front, in order, by `SeedSource`), as the original tool:
with `--seed S` and a single prompt making a single image, that image has seed S;
otherwise seeds come from `random.Random(S).randint(0, 2**32 - 1)` (an unseeded
`random.Random()` without `--seed`); `--d` seeds override per image (when they run out the
last one repeats); `--iter_same_seed` draws one seed per `--n_iter` round. What each seed's
random stream draws, and in which order, is `library.sampling.noise`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


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


RANDOM_SEED = -1  # `--d -1`: a random seed for that image


def seeds_for_line(
    source: SeedSource, count: int, given: list[int] | None, iter_seed: int | None
) -> Iterator[int]:
    """Seeds of the `count` images of one prompt line (`--d` values first, as the original; once
    they run out the last one repeats), each drawn when it is taken (a count of 10**12 holds no list).
    A `--d` value of -1 is a random seed for that image (the web UIs' convention), drawn like an image
    without `--d`; repeated, it draws again."""
    pending = list(given) if given is not None else None
    previous: int | None = None
    for _ in range(count):
        if pending is not None:
            seed = pending.pop(0) if pending else previous
            previous = seed
        else:
            seed = iter_seed
        yield source.draw() if seed is None or seed == RANDOM_SEED else seed
