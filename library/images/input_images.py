"""Input image files and image tensors: img2img sources, inpainting masks, ControlNet hints.

`list_images` / `load_rgb` / `load_mask` read the input files, turning every unreadable file
into a one-line `UserError`; `GuideImages` hands out the `--guide_image_path` images (ControlNet
hints, CLIP image / VGG16 guidance) in turn; `pil_to_tensor` / `mask_to_tensor` / `tensor_to_pil` convert
between PIL images and NCHW tensors ([-1, 1] pixels, [0, 1] masks), also for the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from library.errors import UserError, first_line
from library.records.limits import MAX_SIDE, check_image_header

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported lazily, where a tensor is made
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def list_images(path: Path, option: str = "--image_path") -> list[Path]:
    """The images named by `option`: the file itself, or a folder's images in name order.

    Folder entries with extension png/jpg/jpeg/webp (any case) are sorted as strings,
    like the original (`1.jpg, 10.jpg, 2.jpg`).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{option} {path}: no such file or folder; check the path")
    found = sorted(
        (p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.name,
    )
    if not found:
        raise UserError(f"{option} {path}: the folder has no .png/.jpg/.jpeg/.webp images; add some or pick another")
    return found


class GuideImages:
    """The `--guide_image_path` images of a run, handed out in turn (image n gets n mod count).

    With several ControlNets (`per_image` > 1) and at least as many guides, the guides go in
    groups of `per_image`, as in the original: image n gets group n mod (count // per_image), and
    ControlNet k of it guide k of the group (`--guide_image_path canny.png depth.png` for a canny
    and a depth ControlNet). With fewer guides than ControlNets every ControlNet of image n gets
    guide n mod count (the original stops with an error there)."""

    def __init__(self, guide_path: str | Sequence[str], per_image: int = 1) -> None:
        """`guide_path`: a file or folder, or several of them (their images one after the other)."""
        given = [guide_path] if isinstance(guide_path, str) else list(guide_path)
        self.paths = [p for g in given for p in list_images(Path(g), "--guide_image_path")]
        for path in self.paths:  # decode each once now: a damaged file stops the run before any output
            load_rgb(path)
        self.per_image = per_image if len(self.paths) >= per_image else 1
        unused = len(self.paths) % self.per_image
        if unused:
            logger.warning("--guide_image_path: %d guide images for %d ControlNets (one group of %d per "
                           "image): the last %d are not used", len(self.paths), self.per_image, self.per_image,
                           unused)
        self._next = 0

    def next_group(self) -> tuple[str, ...]:
        """The next image's guides: one per ControlNet, or one for all."""
        groups = len(self.paths) // self.per_image
        first = (self._next % groups) * self.per_image
        self._next += 1
        return tuple(str(p) for p in self.paths[first:first + self.per_image])

    def next_path(self) -> str:
        """The next image's (first) guide."""
        return self.next_group()[0]


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """`Image.open` without PIL's DecompressionBombWarning: the size is ours to check, from the
    header (`check_image_header`, a smaller limit than PIL's), before anything is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        yield image


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, EXIF rotation applied; damage -> UserError.

    The size is checked from the header first (`library.records.limits.MAX_SIDE`), before decoding."""
    try:
        with _opened(path) as im:
            check_image_header(im.size, str(path))
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file; check the path") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not an image or damaged ({e}); replace or remove it") from e


def check_image_file(path: Path) -> None:
    """An image file's header is readable and its size within the limit (nothing decoded)."""
    try:
        with _opened(path) as im:
            check_image_header(im.size, str(path))
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file; check the path") from e
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: far larger than {MAX_SIDE} pixels a side; make it smaller first") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not an image or damaged ({first_line(e)}); replace or remove it") from e


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth greyscale (I;16*, I, F; 16-bit PNGs) scaled to 8-bit "L".

    Pillow's own convert clips such values at 255 instead of scaling them.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image


def load_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB.

    Transparency (RGBA, LA, palette with transparency) is composited onto white, as A1111's
    img2img does, because the colour under fully transparent pixels is arbitrary.
    """
    image = _to_8bit(_open_image(path))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_dropping_alpha(path: Path) -> Image.Image:
    """An image file as 8-bit RGB with any alpha channel dropped (region masks, as the original
    reads them: the colour under transparent pixels counts)."""
    image = _to_8bit(_open_image(path))
    if image.mode in ("P", "PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_mask(path: Path) -> Image.Image:
    """A mask file as 8-bit greyscale "L" (white = repaint).

    A mask with real transparency (some alpha below 255) is read from its alpha channel,
    opaque = repaint, as A1111 reads RGBA masks; otherwise colour is converted to luma.
    """
    image = _to_8bit(_open_image(path))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")


def pil_to_tensor(
    images: Image.Image | Sequence[Image.Image],
    size: tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> torch.Tensor:
    """RGB images -> float32 NCHW tensor in [-1, 1] (`x / 255 * 2 - 1`).

    `size` = (width, height) resizes each image whose size differs (LANCZOS by default, as
    the original does for img2img sources). All images must end up the same size.
    """
    import torch

    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for image in images:
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), resample=resample)
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images differ in size: {[a.shape[1::-1] for a in arrays]}; pass size=")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch / 255.0 * 2.0 - 1.0


def mask_to_tensor(
    masks: Image.Image | Sequence[Image.Image], size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Masks -> float32 N1HW tensor in [0, 1] (1 = white = repaint), resized bilinearly."""
    import torch

    if isinstance(masks, Image.Image):
        masks = [masks]
    arrays = []
    for mask in masks:
        mask = mask.convert("L")
        if size is not None and mask.size != tuple(size):
            mask = mask.resize(tuple(size), resample=Image.Resampling.BILINEAR)
        arrays.append(np.asarray(mask, dtype=np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"masks differ in size: {[a.shape[::-1] for a in arrays]}; pass size=")
    return torch.from_numpy(np.stack(arrays))[:, None] / 255.0


def tensor_to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """NCHW tensor in [-1, 1] -> PIL images (RGB for 3 channels, "L" for 1).

    Values map by `((x + 1) / 2).clamp(0, 1) * 255`, rounded to nearest (ties to even).
    """
    import torch

    if batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected an N x (1|3) x H x W tensor, got shape {tuple(batch.shape)}")
    pixels = (((batch.detach().float().cpu() + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    if batch.shape[1] == 1:
        return [Image.fromarray(a[:, :, 0], "L") for a in arrays]
    return [Image.fromarray(a, "RGB") for a in arrays]
