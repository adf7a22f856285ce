"""Highres fix: a small 1st image, upscaled, then img2img at full size. Two pipeline calls.

Sizes: the 1st stage is `int(size * scale + 0.5)` rounded down to a multiple of 32 in each
direction (1024 x 0.5 -> 512, as the manual's example); the 2nd stage has the final
`--W/--H` size. Steps: the 1st stage runs `--highres_fix_steps`; the 2nd is img2img with
`--steps` and `--strength` (`--t` per prompt), started by the original's img2img rule
(`library.sampling.img2img.start_indices`). As the original, `--highres_fix_strength` is the 1st
stage's strength, which only counts when the 1st stage is img2img (default: `--strength`).
SDXL's size conditioning (`library.records.size_conditioning`): the 1st stage's original sizes
and crop are the given ones times `--highres_fix_scale` (`int(x * scale + 0.5)`, as the
original); those not given follow the 1st stage's own size.

Seeds: the 1st stage uses the image's seed, the 2nd seed + 1 (as the original); files and
metadata show the image's seed. File names carry the stage, "0" for the 1st and "1" for the
final image.

Upscaling the 1st stage (one of):
* default: decode, resize the image with Lanczos, encode again (posterior sample from the
  2nd stage's generator);
* `--highres_fix_latents_upscaling [bicubic|bilinear]`: interpolate the latents (bicubic when
  given alone, as the original's flag; the mode argument is ours);
* `--highres_fix_upscaler MODULE --highres_fix_upscaler_args "k=v,..."`: a module with
  `create_upscaler(**kwargs)` returning an object with

      support_latents() -> bool
      upscale(vae, images, latents, dtype, width, height, batch_size, vae_batch_size)

  `images` are the 1st-stage PIL images, `latents` the 1st-stage latents (B, 4, h, w) in the
  U-Net's latent space (scaled by the VAE's scaling factor) or None when it does not
  support latents. It returns latents (B, 4, height/8, width/8) in that space when it
  supports latents, else a list of `width` x `height` PIL images, which are encoded.
  `library/sampling/latent_upscaler.py` is the one shipped.

ControlNet guides both stages (its hint made at each stage's size) unless
`--highres_fix_disable_control_net` is given, which leaves the 2nd stage without it.

Highres fix with img2img (`--image_path`), as the original's code allows: the 1st stage is
img2img of the source (and inpainting with its mask) at the 1st-stage size with
`--highres_fix_strength` (default `--strength`); the 2nd stage is img2img of the upscaled 1st
image with `--strength`, without the mask (as the original).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.images import input_images as image_io
from library.records.jobs import Job
from library.records.options import HighresOptions
from library.sampling.img2img import Img2ImgInput
from library.user_code import import_file

logger = logging.getLogger(__name__)

SIZE_STEP = 32


def first_stage_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The 1st stage's size: int(size * scale + 0.5), rounded down to a multiple of 32."""
    sizes = []
    for value in (width, height):
        scaled = int(value * scale + 0.5)
        sizes.append(scaled - scaled % SIZE_STEP)
    if min(sizes) < SIZE_STEP:
        raise UserError(f"--highres_fix_scale {scale}: the 1st stage of {width}x{height} would be under 32 pixels; "
                        "use a larger scale or size")
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class HighresSettings:
    """The Highres fix options of a run."""

    scale: float
    steps: int = 28
    save_1st: bool = False
    latents_upscaling: str | None = None  # "bilinear" / "bicubic"
    upscaler: object | None = None
    upscaler_name: str | None = None
    control_net_2nd: bool = True  # False: `--highres_fix_disable_control_net`
    first_strength: float | None = None  # `--highres_fix_strength`: the 1st stage's, when it is img2img

    @property
    def upscaler_label(self) -> str:
        if self.upscaler_name:
            return self.upscaler_name
        return f"Latent ({self.latents_upscaling})" if self.latents_upscaling else "Lanczos"


class HighresFix:
    """Runs both stages of a batch with one Pipeline."""

    def __init__(self, settings: HighresSettings) -> None:
        self.settings = settings

    def stages(self, job: Job) -> tuple[Job, Job]:
        """The 1st-stage job (small; txt2img, or img2img of the job's source) and the
        2nd-stage job (img2img of the upscaled 1st image, seed + 1, no mask)."""
        scale = job.highres_scale or self.settings.scale
        width, height = first_stage_size(job.width, job.height, scale)
        strength = None
        if job.init_image is not None:
            strength = self.settings.first_strength if self.settings.first_strength is not None else job.strength
        sizes = None if job.sizes is None else job.sizes.scaled(scale)  # the line's --hfs too
        first = replace(job, width=width, height=height, steps=self.settings.steps, strength=strength, sizes=sizes)
        second = replace(job, seed=job.seed + 1, mask_image=None)
        if not self.settings.control_net_2nd:
            second = replace(second, guide_image=None)
        return first, second

    def metadata(self, job: Job) -> tuple[tuple[str, object], ...]:
        """Extra A1111-style parameters of a final image."""
        width, height = first_stage_size(job.width, job.height, job.highres_scale or self.settings.scale)
        return (("Hires 1st pass size", f"{width}x{height}"), ("Hires 1st pass steps", self.settings.steps),
                ("Hires upscaler", self.settings.upscaler_label))

    def generate(self, pipeline, batch: list[Job], vae_batch_size: int,
                 on_first: Callable[[list[Job], list[Image.Image]], None] | None = None,
                 sources=None) -> torch.Tensor:
        """Final latents of `batch`; `on_first` receives the 1st-stage jobs and images;
        `sources` (`library.sampling.img2img.SourceImages`) loads the 1st stage's img2img sources."""
        firsts, seconds = zip(*(self.stages(job) for job in batch))
        first_init = sources.load(list(firsts), vae_batch_size) if firsts[0].init_image is not None else None
        latents = pipeline.latents(list(firsts), first_init)
        pictures = None
        if self.settings.save_1st or not self.settings.latents_upscaling:
            pictures = image_io.tensor_to_pil(pipeline.decode(latents, vae_batch_size))
        if self.settings.save_1st and on_first is not None:
            on_first(list(firsts), pictures)
        final = batch[0]
        init = self._upscaled(pipeline, latents, pictures, final.width, final.height, vae_batch_size)
        init.strength = final.strength
        return pipeline.latents(list(seconds), init)

    def _upscaled(self, pipeline, latents: torch.Tensor, pictures: list[Image.Image] | None, width: int, height: int,
                  vae_batch_size: int) -> Img2ImgInput:
        """The 2nd stage's start: upscaled latents or upscaled images to encode."""
        s = self.settings
        if s.latents_upscaling:
            size = (height // pipeline.vae_scale, width // pipeline.vae_scale)
            upscaled = F.interpolate(latents.float(), size=size, mode=s.latents_upscaling, align_corners=False)
            return Img2ImgInput(1.0, latents=upscaled)
        if s.upscaler is not None:
            return self._module_upscaled(pipeline, latents, pictures, width, height, vae_batch_size)
        resized = [p.resize((width, height), Image.Resampling.LANCZOS) for p in pictures]
        return Img2ImgInput(1.0, images=image_io.pil_to_tensor(resized), vae_batch_size=vae_batch_size)

    def _module_upscaled(self, pipeline, latents, pictures, width, height, vae_batch_size) -> Img2ImgInput:
        upscaler = self.settings.upscaler
        if upscaler.support_latents():
            out = upscaler.upscale(pipeline.vae, pictures, latents, pipeline.dtype, width, height,
                                   batch_size=len(pictures), vae_batch_size=vae_batch_size)
            expected = (latents.shape[0], latents.shape[1], height // pipeline.vae_scale, width // pipeline.vae_scale)
            if tuple(out.shape) != expected:
                raise UserError(f"--highres_fix_upscaler {self.settings.upscaler_name}: returned latents of shape "
                                f"{tuple(out.shape)}, expected {expected}")
            return Img2ImgInput(1.0, latents=out)
        out = upscaler.upscale(pipeline.vae, pictures, None, pipeline.dtype, width, height,
                               batch_size=len(pictures), vae_batch_size=vae_batch_size)
        return Img2ImgInput(1.0, images=image_io.pil_to_tensor(list(out), (width, height)),
                            vae_batch_size=vae_batch_size)


# ----------------------------------------------------------------------------- upscaler modules


def parse_upscaler_args(text: str | None) -> dict[str, str]:
    """`"k=v,k2=v2"` as a dict (values are strings; the module converts them)."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f'--highres_fix_upscaler_args "{text}": expected key=value items separated by commas')
        pairs[key.strip()] = value.strip()
    return pairs


def load_upscaler(name: str, args_text: str | None) -> object:
    """Import `name` (a module name like tools.latent_upscaler, or a .py file) and create
    its upscaler with the parsed `--highres_fix_upscaler_args`."""
    module = _import(name)
    if not hasattr(module, "create_upscaler"):
        raise UserError(f"--highres_fix_upscaler {name}: the module has no create_upscaler(**kwargs) function")
    upscaler = module.create_upscaler(**parse_upscaler_args(args_text))
    for method in ("upscale", "support_latents"):
        if not callable(getattr(upscaler, method, None)):
            raise UserError(f"--highres_fix_upscaler {name}: its upscaler has no {method}() method")
    return upscaler


#: module names the manual gives for upscalers shipped inside the library
BUILT_IN_UPSCALERS = {"tools.latent_upscaler": "library.sampling.latent_upscaler"}


def _import(name: str):
    name = BUILT_IN_UPSCALERS.get(name, name)
    if name.endswith(".py"):
        return import_file(name, "--highres_fix_upscaler")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"--highres_fix_upscaler {name}: cannot import it ({exc})") from None


def from_options(options: HighresOptions) -> HighresFix | None:
    """The run's HighresFix, or None without `--highres_fix_scale`."""
    if not options.scale:
        return None
    upscaler = load_upscaler(options.upscaler, options.upscaler_args) if options.upscaler else None
    settings = HighresSettings(options.scale, options.steps, options.save_1st, options.latents_upscaling, upscaler,
                               options.upscaler, control_net_2nd=not options.disable_control_net,
                               first_strength=options.strength)
    return HighresFix(settings)
