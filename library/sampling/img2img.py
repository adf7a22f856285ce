"""img2img and inpainting: source images and masks, their order and sizes, and the math
that starts the denoising loop from a source instead of pure noise.

Order of sources (`--image_path` folder, files sorted by name as strings): images take the
sources in turn, in the order they are generated, across prompt lines and `--n_iter`
rounds: image n (counting from 0 over the whole run) uses source n mod (number of
sources). With `--images_per_prompt 2`, 2 prompts and 3 sources that is
(prompt 1: s1, s2), (prompt 2: s3, s1). When the prompts come from the sources' own
metadata (no prompt option given), each prompt's images use the source it was read from.
The k-th mask (`--mask_path` folder) belongs to the k-th source (masks repeat when there
are fewer; one mask file serves every source); a mask must have its source's size
unless `--W/--H` resize both.

Size: without `--W/--H` (or `--w/--h` on the prompt line) an image keeps its source's
size, rounded down to multiples of 32 as the original (with a warning; sides under 32
pixels to multiples of 8); otherwise the source is resized to the given size
first (Lanczos), which is "upscale using img2img". Masks are resized with their image.

Strength s with `steps` steps: the scheduler is set up for `steps` steps; the original's
start rule (`start_indices`) picks the timestep the VAE-encoded source is noised at (with
the image's own img2img noise, draw 3 of `library.prompts.seeds`; the VAE posterior sample is draw
4) and the tail of the schedule that runs: with the default offset 1 the source is noised
one step stronger than the first step run, with `--force_scheduler_zero_steps_offset` at
that step. s = 1 ignores the source entirely (the image is the txt2img image of the same
seed), except where a mask keeps parts of it.

Inpainting works on any model: after every step, the area outside the mask (mask 0) is
replaced by the source latents noised to the next step's noise level with the same img2img
noise, and by the clean source latents after the last step (the feature
`library.features.inpainting`). Where the mask is 0 the decoded
image is then composited from the VAE round-trip of the source (`composite`), because the
VAE decoder mixes neighbouring latents (and attention mixes all of them): without it the
repainted area would bleed a little into the kept area.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from library.errors import UserError
from library.images import input_images as image_io
from library.records.jobs import Job

logger = logging.getLogger(__name__)

SIZE_STEP = 8  # image sizes are multiples of the VAE's 8x downsampling
SOURCE_SIZE_STEP = 32  # a source's own size is rounded down to this, as the original


# ----------------------------------------------------------------------------- schedule


def steps_to_run(steps: int, strength: float) -> int:
    """Denoising steps img2img runs: int(steps * strength), as the original (below strength 1)."""
    return min(int(steps * strength), steps)


def first_step(steps: int, strength: float) -> int:
    """Index (in steps, before multiplying by the scheduler's order) of the first step run."""
    return steps - steps_to_run(steps, strength)


@dataclass(frozen=True)
class StartIndices:
    """Where img2img starts, as indices into `scheduler.timesteps`.

    `noise`: the timestep the source is noised at (None: not noised, strength 0 with
    offset 0); `begin`: the first timestep the loop runs.
    """

    noise: int | None
    begin: int


def start_indices(steps: int, strength: float, offset: int, order: int = 1) -> StartIndices:
    """The original's img2img start rule, `offset` = the scheduler's `steps_offset`
    (0 with `--force_scheduler_zero_steps_offset`):

        init = min(int(steps * strength) + offset, steps)
        noised at timesteps[-init], the loop runs timesteps[max(steps - init + offset, 0):]

    With offset 1 the source is noised one step stronger than the first step that runs
    (strength 0.6, 10 steps: noised at the 7th-from-last timestep, the last 6 run); with 0 it
    is noised at the first step that runs. Ours counts in sampler steps, so for 2nd-order
    samplers (heun, dpm_2: `order` 2) both indices are multiplied by the order and whole
    steps run (the original indexes the doubled list directly). Where `init` is 0 (strength
    0, offset 0) the source is used as it is: the original's `timesteps[-0]` would noise it
    fully and then run no step. Strength 1 is txt2img from pure noise over every step (the
    source only counts where a mask keeps it); the original would noise the source at the
    first timestep and, with offset 1, skip that step.
    """
    if strength >= 1:
        return StartIndices(None, 0)
    init = min(int(steps * strength) + offset, steps)
    begin = min(max(steps - init + offset, 0), steps) * order
    noise = (steps - init) * order if init > 0 else None
    return StartIndices(noise, begin)


def set_begin_index(scheduler, index: int) -> None:
    """Tell schedulers that track their position (sigma schedulers) where the loop starts."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)


def noised(scheduler, source: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """`source` noised to `timestep`'s noise level, in the scheduler's own parameterization."""
    return scheduler.add_noise(source, noise, timestep.reshape(1).repeat(source.shape[0]))


@dataclass
class Img2ImgInput:
    """What a batch starts from: pixels to encode or latents, optional masks, strength."""

    strength: float
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None = None  # (B, 4, H/8, W/8) in the U-Net's latent space
    masks: torch.Tensor | None = None  # (B, 1, H/8, W/8) in [0, 1], 1 = repaint
    pixel_masks: torch.Tensor | None = None  # (B, 1, H, W), for `composite`
    vae_batch_size: int | None = None
    source_latents: torch.Tensor | None = None  # filled in by `Pipeline.latents`

    @property
    def ignores_source(self) -> bool:
        """Strength 1 without a mask: plain txt2img (the source only decides the size)."""
        return self.strength >= 1 and self.masks is None


def starting_latents(scheduler, source: torch.Tensor, noise, start: StartIndices, strength: float) -> torch.Tensor:
    """The latents the loop starts from: the source noised at `start.noise` (the scheduler is
    then told the loop begins at `start.begin`), or pure noise at strength 1."""
    if strength >= 1:
        set_begin_index(scheduler, start.begin)
        return noise.initial.to(source) * scheduler.init_noise_sigma
    if start.noise is None:
        set_begin_index(scheduler, start.begin)
        return source
    set_begin_index(scheduler, start.noise)  # sigma schedulers read the noise level from it
    latents = noised(scheduler, source, noise.img2img.to(source), scheduler.timesteps[start.noise])
    set_begin_index(scheduler, start.begin)
    return latents


def composite(pixels: torch.Tensor, round_trip: torch.Tensor, pixel_masks: torch.Tensor) -> torch.Tensor:
    """Decoded images where the mask is white, the source's VAE round-trip where it is black."""
    masks = pixel_masks.to(pixels)
    return pixels * masks + round_trip.to(pixels) * (1 - masks)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceFile:
    """One checked input file and its size (width, height)."""

    path: Path
    size: tuple[int, int]


def _checked(paths: list[Path], load) -> list[SourceFile]:
    """Decode every file once up front, so a damaged one stops the run before any output."""
    files = []
    for path in paths:
        with load(path) as image:
            files.append(SourceFile(path, image.size))
    return files


class SourceImages:
    """The `--image_path` sources and `--mask_path` masks of a run, handed out in turn."""

    def __init__(self, image_path: str, mask_path: str | None = None, resized: bool = False) -> None:
        """`resized`: `--W/--H` given, so every source and mask is resized to that size (masks
        of another size than their source are then fine, as in the original)."""
        self.resized = resized
        self.images = _checked(source_paths(image_path), image_io.load_rgb)
        masks = image_io.list_images(Path(mask_path), "--mask_path") if mask_path else []
        self.masks = _checked(masks, image_io.load_mask)
        self._by_path = {str(f.path): i for i, f in enumerate(self.images)}
        self._next = 0
        self._logged: set[Path] = set()
        for source in self.images:
            if min(source.size) < SIZE_STEP:
                raise UserError(f"--image_path {source.path}: {source.size[0]}x{source.size[1]} is too small; "
                                "images need at least 8x8 pixels")
        self._check_mask_sizes()

    def _check_mask_sizes(self) -> None:
        if len(self.masks) > len(self.images):
            logger.warning("--mask_path has %d masks for %d images; the extra masks are not used",
                           len(self.masks), len(self.images))
        for index, image in enumerate(self.images):
            mask = self.mask_for(index)
            if mask is not None and mask.size != image.size and not self.resized:
                raise UserError(
                    f"--mask_path {mask.path} is {mask.size[0]}x{mask.size[1]} but its image {image.path} is "
                    f"{image.size[0]}x{image.size[1]}; make the mask the same size as the image, "
                    "or give --W/--H to resize both"
                )

    def mask_for(self, index: int) -> SourceFile | None:
        return self.masks[index % len(self.masks)] if self.masks else None

    def assign(self, job: Job, own_image: str | None = None) -> Job:
        """`job` with its source, mask and final size; the next source in turn, or `own_image`."""
        if own_image is not None:
            index = self._by_path[own_image]
        else:
            index = self._next % len(self.images)
            self._next += 1
        source, mask = self.images[index], self.mask_for(index)
        width, height = self._size(source, job.width, job.height)
        return replace(job, init_image=str(source.path), mask_image=str(mask.path) if mask else None,
                       width=width, height=height)

    def _size(self, source: SourceFile, width: int | None, height: int | None) -> tuple[int, int]:
        """Given sizes win; otherwise the source's, rounded down to multiples of 32 as the
        original (sides under 32 pixels to multiples of 8), with a warning once per source."""
        w, h = source.size
        rounded = (_round_side(w), _round_side(h))
        if (width is None or height is None) and rounded != (w, h) and source.path not in self._logged:
            self._logged.add(source.path)
            logger.warning("%s: %dx%d rounded down to %dx%d (multiples of 32, as the original)",
                           source.path.name, w, h, *rounded)
        return width or rounded[0], height or rounded[1]

    def load(self, jobs: list[Job], vae_batch_size: int | None = None) -> Img2ImgInput:
        """Pixels (resized to each job's size) and masks of one batch."""
        first = jobs[0]
        size = (first.width, first.height)
        pictures = [image_io.load_rgb(Path(j.init_image)) for j in jobs]
        batch = Img2ImgInput(first.strength, images=image_io.pil_to_tensor(pictures, size),
                             vae_batch_size=vae_batch_size)
        if first.mask_image is None:
            return batch
        masks = [image_io.load_mask(Path(j.mask_image)).resize(size, Image.Resampling.BILINEAR)
                 for j in jobs]
        batch.pixel_masks = image_io.mask_to_tensor(masks)
        batch.masks = image_io.mask_to_tensor(masks, (size[0] // SIZE_STEP, size[1] // SIZE_STEP))
        return batch


def _round_side(value: int) -> int:
    """A source side without --W/--H: down to a multiple of 32, or of 8 below 32 pixels."""
    step = SOURCE_SIZE_STEP if value >= SOURCE_SIZE_STEP else SIZE_STEP
    return value - value % step


def source_paths(image_path: str) -> list[Path]:
    """The files of `--image_path` in the documented order."""
    return image_io.list_images(Path(image_path), "--image_path")
