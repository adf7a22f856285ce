"""Region masks of an attention couple: which part of the image each prompt part paints.

A prompt split at `` AND `` has parts 0..n-1 (`library.text.weighting.split_and`). The region
mask is the first image of `--mask_path` when networks are loaded (regional LoRA, as the
original) or when `--attention_couple` is given; it is then not an inpainting mask. It is read
as RGB (alpha dropped, greyscale copied to the three channels, as the original); when both
`--W` and `--H` are given it is first resized (Lanczos) to the generation size, with Highres
fix to the 1st-stage size. Region of part k:

* channel mode (default): part k < 3 uses channel k (R, G, B) / 255, fractional values allowed;
* colour codes (`--network_regional_mask_max_color_codes K`, 1..7): part k < K is where the
  pixel is exactly 255 x the bits of k+1 (R = bit 0, G = bit 1, B = bit 2): red, green, yellow,
  blue, magenta, cyan, white;
* parts beyond those (k >= 3, k >= K) and all-zero regions cover the whole image.

Without a mask every part covers the whole image, and the merge (`library.features.attention_couple`)
gives each part 1/n. Regions are resized (bilinear, align_corners False) to each attention
resolution the U-Net actually meets (`resized`), so Deep Shrink and Gradual Latent sizes work.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.images import input_images as image_io

logger = logging.getLogger(__name__)

MAX_COLOR_CODES = 7
COLOR_NAMES = ("red", "green", "yellow", "blue", "magenta", "cyan", "white")


def color_code(index: int) -> tuple[int, int, int]:
    """The RGB colour of region `index` in colour-code mode: bits of index+1 (R = bit 0)."""
    code = index + 1
    return tuple(255 * ((code >> bit) & 1) for bit in range(3))  # type: ignore[return-value]


@dataclass
class RegionMask:
    """One region mask image and the rule (channels or colour codes) that reads it."""

    path: Path
    pixels: np.ndarray  # (H, W, 3) uint8
    color_codes: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def mode(self) -> str:
        """For logs and metadata: "RGB channels" or "colour codes (K)"."""
        return "RGB channels" if self.color_codes is None else f"colour codes ({self.color_codes})"

    def defined(self) -> int:
        """How many parts the mask can give a region (3 channels, or K colour codes)."""
        return 3 if self.color_codes is None else self.color_codes

    def region(self, part: int) -> torch.Tensor:
        """Part `part`'s region (H, W) in [0, 1] at the mask's size; ones for the whole image."""
        if part >= self.defined():
            return torch.ones(self.pixels.shape[:2])
        if self.color_codes is None:
            values = torch.from_numpy(self.pixels[..., part].astype(np.float32) / 255.0)
        else:
            values = torch.from_numpy(np.all(self.pixels == np.array(color_code(part), np.uint8), axis=-1)
                                      .astype(np.float32))
        return values if bool(values.any()) else torch.ones_like(values)

    def regions(self, parts: int) -> torch.Tensor:
        """Regions of parts 0..parts-1, (parts, H, W)."""
        if parts not in self._cache:
            self._cache[parts] = torch.stack([self.region(k) for k in range(parts)])
        return self._cache[parts]

    def covered(self) -> bool:
        """Whether any part gets a region of its own (not all black / no pixel of a colour code)."""
        return any(self._any_marked(k) for k in range(self.defined()))

    def _any_marked(self, part: int) -> bool:
        if self.color_codes is None:
            return bool(self.pixels[..., part].any())
        return bool(np.all(self.pixels == np.array(color_code(part), np.uint8), axis=-1).any())


def load_region_mask(path: str, color_codes: int | None, size: tuple[int, int] | None) -> RegionMask:
    """The first image of `path` as a region mask, resized (Lanczos) to `size` = (W, H) if given.

    A mask that gives no part a region (all black, or no pixel exactly of a colour code) is
    refused with a one-line `UserError`: it would silently be the plain prompt.
    """
    files = image_io.list_images(Path(path), "--mask_path")
    if len(files) > 1:
        logger.warning("--mask_path %s: %d images; the region mask is the first, %s", path, len(files), files[0].name)
    image = image_io.load_rgb_dropping_alpha(files[0])
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    mask = RegionMask(files[0], np.asarray(image, dtype=np.uint8).copy(), color_codes)
    if not mask.covered():
        if color_codes is None:
            why = "all three channels are black"
        else:
            why = f"no pixel is exactly one of the colour codes {', '.join(COLOR_NAMES[:color_codes])}"
        raise UserError(f"--mask_path {files[0]}: not a region mask: {why}; paint each part's region "
                        "(R, G, B channels, or exact colour codes with --network_regional_mask_max_color_codes)")
    logger.info("region mask %s: %s, %dx%d", files[0].name, mask.mode, image.size[0], image.size[1])
    return mask


def resized(regions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, H, W) regions -> (n, height, width), bilinear with align_corners False, no antialias."""
    if tuple(regions.shape[-2:]) == (height, width):
        return regions
    return F.interpolate(regions[None], (height, width), mode="bilinear", align_corners=False)[0]


@lru_cache(maxsize=256)
def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of `tokens` attention tokens for a latent of `height` x `width`.

    The grid is the divisor pair h * w = tokens whose aspect ratio is closest to the latent's,
    so any size a U-Net block actually meets (halvings, odd sizes, Deep Shrink, Gradual Latent)
    is found without a table of expected sizes.
    """
    target = math.log(height / width)
    pairs = [(h, tokens // h) for h in range(1, math.isqrt(tokens) + 1) if tokens % h == 0]
    pairs += [(w, h) for h, w in pairs]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - target))
