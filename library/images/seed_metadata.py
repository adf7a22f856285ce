"""The seed extras in an image's metadata: our PNG text keys and the web UI's infotext fields.

Ours: `variation-seed` and `variation-seed-strength` (with a strength above 0),
`seed-resize-from` (`WxH`), `eta-noise-seed-delta`. The web UI's `parameters` fields:
`Variation seed`, `Variation seed strength` (only when not 0), `Seed resize from` (`WxH`),
`ENSD`. `library.images.infotext_reader` reads both back.
"""

from __future__ import annotations

from library.images.metadata import FeatureMetadata
from library.records.variation_settings import Variation


def seed_metadata(variation: Variation | None, ensd: int) -> FeatureMetadata:
    """What one image's variation seed, seed resize and the run's ENSD write (nothing when off)."""
    text: list[tuple[str, str]] = []
    parameters: list[tuple[str, object]] = []
    if variation is not None and variation.varies:
        text += [("variation-seed", str(variation.subseed)), ("variation-seed-strength", repr(variation.strength))]
        parameters += [("Variation seed", variation.subseed), ("Variation seed strength", variation.strength)]
    if variation is not None and variation.resize_from is not None:
        size = f"{variation.resize_from[0]}x{variation.resize_from[1]}"
        text.append(("seed-resize-from", size))
        parameters.append(("Seed resize from", size))
    if ensd:
        text.append(("eta-noise-seed-delta", str(ensd)))
        parameters.append(("ENSD", ensd))
    return FeatureMetadata(tuple(text), tuple(parameters))
