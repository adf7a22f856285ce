"""Variation seeds and seed resize per image: which main seed and which `Variation` each image
of a prompt line gets (the web UI's rules, on our per-image seeds).

- The line's `--vs/--vss/--srw/--srh` override `--subseed/--subseed_strength/
  --seed_resize_from_w/--seed_resize_from_h`.
- With a strength above 0, every image of the line keeps the main seed of its first image
  (unless `--d` gives each image its own seed) and image k gets the variation seed
  `subseed + k`; without a subseed, `seed + 1 + k` (all modulo 2**32). So the images of a line
  are the same picture, a little different, as in the web UI's batches.
- With strength 0 and no resize, nothing changes: the plain seeds, no `Variation`.
- A seed resize needs both sides (else one error line).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from library.errors import UserError
from library.records.limits import MAX_SEED
from library.records.variation_settings import Variation, VariationDefaults


def resize_from(width: int | None, height: int | None, where: str) -> tuple[int, int] | None:
    """(width, height) of a seed resize, None without one; one side alone is a `UserError`."""
    if width is None and height is None:
        return None
    if width is None or height is None:
        raise UserError(f"{where}: a seed resize needs both the width and the height")
    return width, height


def line_variations(seeds: Iterable[int], defaults: VariationDefaults, overrides, explicit_seeds: bool
                    ) -> tuple[Iterable[int], Iterable[Variation | None]]:
    """(main seeds, variations) of a line's images whose drawn seeds are `seeds`. Without a
    variation strength both stay lazy (`--images_per_prompt 1000000000000` holds no list)."""
    o = overrides
    strength = o.subseed_strength if o.subseed_strength is not None else defaults.strength
    subseed = o.subseed if o.subseed is not None else defaults.subseed
    resize = resize_from(o.seed_resize_from_w if o.seed_resize_from_w is not None else defaults.resize_w,
                         o.seed_resize_from_h if o.seed_resize_from_h is not None else defaults.resize_h,
                         "--srw/--srh (--seed_resize_from_w/--seed_resize_from_h)")
    if not strength and resize is None:
        return seeds, itertools.repeat(None)
    if not strength:
        return seeds, itertools.repeat(Variation(None, 0.0, resize))
    seeds = list(seeds)
    mains = list(seeds) if explicit_seeds else [seeds[0]] * len(seeds)
    variations: list[Variation | None] = []
    for k, main in enumerate(mains):
        sub = (subseed + k) if subseed is not None else (main + 1 + k)
        variations.append(Variation(sub % (MAX_SEED + 1), float(strength), resize))
    return mains, variations
