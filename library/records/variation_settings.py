"""Variation seeds and seed resize of one image (the web UI's "Extra" seed settings).

`Variation` is what a Job carries; `library.sampling.variation_noise` makes its start noise
and `library.prompts.variation` decides it per image. A Job without variation has None.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variation:
    """`subseed` and `strength`: the start noise moves from the seed's (0) to the subseed's (1)
    along a sphere; `resize_from` (width, height): both noises are drawn at that size and pasted
    centred into the full-size noise of the seed. `subseed` None: no variation (strength 0)."""

    subseed: int | None = None
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None

    @property
    def varies(self) -> bool:
        """The subseed's noise takes part (strength above 0)."""
        return self.subseed is not None and self.strength > 0

    @property
    def active(self) -> bool:
        """The start noise differs from the plain seed's."""
        return self.varies or self.resize_from is not None


@dataclass(frozen=True)
class VariationDefaults:
    """The command line's `--subseed`, `--subseed_strength`, `--seed_resize_from_w/_h`
    (prompt lines override each; `library.prompts.variation` decides each image's `Variation`)."""

    subseed: int | None = None
    strength: float = 0.0
    resize_w: int | None = None
    resize_h: int | None = None
