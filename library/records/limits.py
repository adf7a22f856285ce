"""What a run can do at most (and at least): image sizes, steps per sampler, seeds, numbers.

Each limit is a named constant and each check a small pure function raising `UserError`
with one line that says the limit, so no input can make a run that never ends, eats the
machine, or crashes inside a library:

- Image sides: at most `MAX_SIDE` pixels (`--W/--H`, `--w/--h`, img2img sources, masks and
  ControlNet guides; image files are checked from their header, before decoding), and at
  least what the U-Net can halve (`min_side`: 64 px for SD, whose U-Net halves the latent
  three times; a 1x1 latent crashes its normalisation layers).
- Steps: 1..`MAX_STEPS` (the training schedule has 1000 timesteps); `ddim` and `pndm`
  offset the schedule by one timestep, so at most 999; `pndm` needs at least 4 (its
  Runge-Kutta warm-up); `lcm` at most 50 (its distilled schedule).
- Seeds: 0..`MAX_SEED` (2**32 - 1), the range the original draws seeds from.
- Integers in a prompt line: at most `MAX_DIGITS` digits, checked before conversion
  (Python refuses to convert 4,300+ digits, and no option needs more than 20).
- `--batch_size`: at most `MAX_BATCH_SIZE` images in one U-Net batch (a typo's 10000 would
  allocate every image's latents and activations at once); `--images_per_prompt` and
  `--n_iter` have no limit, as their Jobs are made one batch at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from library.errors import UserError

if TYPE_CHECKING:
    from library.records.options import GenerationOptions

MAX_SIDE = 8192
#: Largest SDXL size-conditioning number (original size, crop): far past any training image;
#: the sinusoids of larger numbers lose their precision in float32.
MAX_CONDITIONING_SIZE = 65536
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
MAX_DIGITS = 20
MAX_BATCH_SIZE = 1024
#: Per-sampler (base name) step ranges where they are narrower than 1..MAX_STEPS.
SAMPLER_STEPS = {"ddim": (1, 999), "pndm": (4, 999), "lcm": (1, 50)}


def steps_range(sampler: str) -> tuple[int, int]:
    """(fewest, most) steps the sampler can run, inclusive."""
    from library.records.samplers import ALIASES

    base = sampler.lower().removesuffix("_karras")
    return SAMPLER_STEPS.get(ALIASES.get(base, base), (1, MAX_STEPS))


def check_steps(steps: int, sampler: str, option: str = "--steps") -> None:
    """`steps` within what `sampler` can run; the message names `option` and the range."""
    low, high = steps_range(sampler)
    if not low <= steps <= high:
        raise UserError(f"{option} {steps}: --sampler {sampler} runs {low} to {high} steps")


def check_batch_size(batch_size: int) -> None:
    """`--batch_size` within 1..MAX_BATCH_SIZE."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch_size {batch_size}: must be 1 to {MAX_BATCH_SIZE} images per batch")


def check_side(value: int, option: str, minimum: int = 8) -> None:
    """An image side: a multiple of 8 from `minimum` to `MAX_SIDE`."""
    if value < minimum or value > MAX_SIDE or value % 8:
        raise UserError(f"{option} {value}: must be a multiple of 8 from {minimum} to {MAX_SIDE}")


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed in 0..MAX_SEED."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} {_short_number(seed)}: seeds are 0 to {MAX_SEED} (2**32 - 1)")


def check_image_header(size: tuple[int, int], what: str) -> None:
    """An image file's size (from its header, before decoding) within `MAX_SIDE` a side."""
    width, height = size
    if max(width, height) > MAX_SIDE:
        raise UserError(f"{what}: {width}x{height} is larger than {MAX_SIDE} pixels a side; "
                        "make it smaller first")


def check_finite(values: Iterable[tuple[str, object]]) -> None:
    """Every float (or float in a list) of `(option, value)` pairs is finite."""
    for option, value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"{option} {item}: must be a finite number")


def min_side(unet, vae_scale: int) -> int:
    """The smallest image side the U-Net can run: its latent must survive every halving."""
    levels = len(getattr(unet.config, "down_block_types", ())) or 1
    return vae_scale * 2 ** (levels - 1)


def check_jobs(jobs: list, pipeline, highres=None) -> None:
    """Each job's (and Highres 1st stage's) size and steps against the model and sampler."""
    smallest = min_side(pipeline.unet, pipeline.vae_scale)
    for job in jobs:
        stages = (highres.stages(job)[0], job) if highres is not None else (job,)
        for stage in stages:
            for name, value in (("width", stage.width), ("height", stage.height)):
                if value is not None and (value < smallest or value > MAX_SIDE):
                    raise UserError(f"image {name} {value}: this model makes {smallest} to {MAX_SIDE} pixels "
                                    "a side")
            check_steps(stage.steps, getattr(stage, "sampler", None) or pipeline.sampler, "steps")


def check_defaults(generation: GenerationOptions, pipeline) -> None:
    """`--W/--H` against the loaded model's smallest size, before any prompt line runs."""
    smallest = min_side(pipeline.unet, pipeline.vae_scale)
    given = (("W", generation.width, generation.width_given), ("H", generation.height, generation.height_given))
    for name, value, typed in given:
        if typed and value < smallest:
            raise UserError(f"--{name} {value}: this model makes {smallest} to {MAX_SIDE} pixels a side")


def _short_number(value: int) -> str:
    """An integer as text; a huge one by its size, not its thousands of digits."""
    if abs(value) < 10**30:
        return str(value)
    digits = int(abs(value).bit_length() * math.log10(2)) + 1
    return f"{'-' if value < 0 else ''}(a number of about {digits} digits)"
