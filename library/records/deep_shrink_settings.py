"""Deep Shrink's settings: what the command line (`--ds_*`) and prompt lines (`--dsd1 --dst1
--dsd2 --dst2 --dsr`) ask for, checked.

Separate from the feature (`library.features.deep_shrink`, which has the semantics) so that parsing
and checking options imports no torch: a bad option is reported in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.errors import UserError

DEFAULT_TIMESTEPS = 650
DEFAULT_RATIO = 0.5
MAX_RATIO = 2.0  # a larger ratio grows the deep layers' state without bound (1e9: an allocation that never ends)
PROMPT_DEFAULT_DEPTH = 3  # a prompt that sets only --dst1/--dsd2/--dst2/--dsr, with no depth anywhere


@dataclass(frozen=True)
class DeepShrink:
    """One image's Deep Shrink settings."""

    depth_1: int
    timesteps_1: int = DEFAULT_TIMESTEPS
    depth_2: int | None = None
    timesteps_2: int = DEFAULT_TIMESTEPS
    ratio: float = DEFAULT_RATIO

    def check_size(self, width: int, height: int, vae_scale: int = 8) -> None:
        """The shrunk state has at least one pixel a side at each depth used (`--W 16` at ratio 0.3
        would shrink a 2-pixel latent to 0); else a `UserError` naming the size and the ratio."""
        for depth in (self.depth_1, self.depth_2):
            if depth is None:
                continue
            for side in (width, height):
                at_depth = -(-(side // vae_scale) // 2**depth)  # each down block halves, rounding up
                if math.floor(at_depth * self.ratio) < 1:
                    raise UserError(f"Deep Shrink ratio {self.ratio:g} shrinks the {width}x{height} image's "
                                    f"{at_depth}-pixel state at depth {depth} to 0 pixels; use a larger ratio, "
                                    "a larger image or a shallower depth")

    def shrinks(self, depth: int, t: int) -> bool:
        """Whether the input of down block `depth` is shrunk at timestep `t`."""
        if depth == self.depth_1 and t >= self.timesteps_1:
            return True
        return depth == self.depth_2 and self.timesteps_2 <= t < self.timesteps_1


def check_ratio(ratio: float, option: str) -> None:
    """A shrink ratio above 0 and at most `MAX_RATIO` (which also refuses inf and nan)."""
    if not 0 < ratio <= MAX_RATIO:
        raise UserError(f"{option} {ratio:g}: must be above 0 and at most {MAX_RATIO:g} (0.5 halves the deep "
                        "layers' size)")


def from_values(depth_1: int | None, timesteps_1: int = DEFAULT_TIMESTEPS, depth_2: int | None = None,
                timesteps_2: int | None = DEFAULT_TIMESTEPS, ratio: float = DEFAULT_RATIO) -> DeepShrink | None:
    """The settings of the command line's `--ds_*` values (None: off); a missing t2 counts as 1000."""
    if depth_1 is None:
        return None
    check_ratio(ratio, "--ds_ratio")
    return DeepShrink(depth_1, timesteps_1, depth_2, 1000 if timesteps_2 is None else timesteps_2, ratio)


def with_overrides(base: DeepShrink | None, overrides) -> DeepShrink | None:
    """A prompt line's settings: its `--dsd1 --dst1 --dsd2 --dst2 --dsr` over the command line's.

    Only `--dst1/--dsd2/--dst2/--dsr` given: depth 1 is the command line's, else 3 (the original
    turns a command-line depth 0 into 3 there: not copied).
    """
    o = overrides
    given = [o.ds_depth_1, o.ds_timesteps_1, o.ds_depth_2, o.ds_timesteps_2, o.ds_ratio]
    if all(v is None for v in given):
        return base
    start = base or DeepShrink(PROMPT_DEFAULT_DEPTH)
    ratio = start.ratio if o.ds_ratio is None else o.ds_ratio
    check_ratio(ratio, "--dsr")
    return DeepShrink(
        depth_1=start.depth_1 if o.ds_depth_1 is None else o.ds_depth_1,
        timesteps_1=start.timesteps_1 if o.ds_timesteps_1 is None else o.ds_timesteps_1,
        depth_2=start.depth_2 if o.ds_depth_2 is None else o.ds_depth_2,
        timesteps_2=start.timesteps_2 if o.ds_timesteps_2 is None else o.ds_timesteps_2,
        ratio=ratio,
    )
