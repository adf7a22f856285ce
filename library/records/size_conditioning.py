"""SDXL's size conditioning of one image: original size, negative original size, crop.

SDXL was trained with the size of each training image before it was resized ("original"),
the top-left corner of the crop taken from it, and the size generated ("target") as extra
inputs of the U-Net. Generating, these numbers steer the image: a small original size gives
a blurry, upscaled look, a crop gives a cut-off subject. The target is always the size being
generated; the rest comes from `--original_height/--original_width`,
`--original_height_negative/--original_width_negative`, `--crop_top/--crop_left` and the
prompt-line options `--oh --ow --nh --nw --ct --cl`.

Defaults (as the original tool): original = the size generated, negative original = the
original, crop = 0. A value left None keeps following its default, so Highres fix's 1st
stage (`scaled`) has its own generated size as the original when none is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class SizeConditioning:
    """The size numbers an image's U-Net rows get; None: the default (module docstring)."""

    original_height: int | None = None
    original_width: int | None = None
    original_height_negative: int | None = None
    original_width_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def time_ids(self, width: int, height: int, negative: bool = False) -> tuple[int, int, int, int, int, int]:
        """(original h, original w, crop top, crop left, target h, target w) of an image of
        `width` x `height`; `negative` gives the negative prompt's (its own original size)."""
        original_h = self.original_height if self.original_height is not None else height
        original_w = self.original_width if self.original_width is not None else width
        if negative:
            original_h = self.original_height_negative if self.original_height_negative is not None else original_h
            original_w = self.original_width_negative if self.original_width_negative is not None else original_w
        return (original_h, original_w, self.crop_top or 0, self.crop_left or 0, height, width)

    def scaled(self, scale: float) -> SizeConditioning:
        """Highres fix's 1st stage: every given number times `scale`, as `int(x * scale + 0.5)`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: None if v is None else int(v * scale + 0.5) for k, v in values.items()})

    def with_overrides(self, **overrides: int | None) -> SizeConditioning:
        """These settings with a prompt line's given numbers (None: not given) put in."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def given(self) -> bool:
        """Whether any number is set (the PNG keys are written for SDXL images in any case)."""
        return any(getattr(self, f.name) is not None for f in fields(self))
