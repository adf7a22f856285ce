"""Image files in and out: output names, atomic PNG/WebP saving, generation metadata, inputs.

Output side: `output_file_name` reproduces the original tool's naming rules so that users'
scripts find their files where they expect them; `save_image` publishes a finished file
atomically and never overwrites one; `generation_text` writes both the original tool's PNG
text keys and an AUTOMATIC1111-style `parameters` chunk that web UIs and image sites import
(facts in `shared/reference/png-metadata.md`). `parse_a1111_parameters` is an independent
reader of that format, used to prove that what we write is read back correctly.

Input side: `list_images` / `load_rgb` / `load_mask` read img2img sources, inpainting masks
and ControlNet hints, turning every unreadable file into a one-line `UserError`;
`pil_to_tensor` / `tensor_to_pil` convert between PIL images and [-1, 1] NCHW tensors.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from library.errors import UserError
from library.limits import MAX_SIDE, check_image_header
from library.messages import exception_text, write_failure

if TYPE_CHECKING:  # torch is imported lazily: tools/show_metadata.py should start fast
    import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_HASH_CHUNK = 1024 * 1024
_MAX_NAME_TRIES = 100_000
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}

# ----------------------------------------------------------------------------- file names


def timestamp_now() -> str:
    """Local time as `YYYYmmddHHMMSS`, the timestamp part of default output names."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


def output_file_name(
    *,
    timestamp: str,
    index: int,
    seed: int,
    highres_stage: str = "",
    sequential: int | None = None,
    original_name: str | None = None,
    prompt_file_name: str | None = None,
) -> str:
    """The file name the original tool gives one image, by its precedence rules.

    1. `--f name` on the prompt line: the name as given; `.png` is appended unless it
       already ends with `.webp` or `.png` (case-insensitive; avoids `x.png.png`).
    2. `--use_original_file_name`: the img2img source's stem + `.png` (no prefix).
    3. `--sequential_file_name`: `im_{hr}{n:06d}.png`, `sequential` being the 1-based number.
    4. Otherwise `im_{timestamp}_{hr}{index:03d}_{seed}.png`.
    `highres_stage` is "0"/"1" for the Highres fix stages and "" without it.
    """
    if prompt_file_name is not None:
        if prompt_file_name.lower().endswith((".webp", ".png")):
            return prompt_file_name
        return prompt_file_name + ".png"
    if original_name is not None:
        return Path(original_name).stem + ".png"
    if sequential is not None:
        return f"im_{highres_stage}{sequential:06d}.png"
    return f"im_{timestamp}_{highres_stage}{index:03d}_{seed}.png"


# ----------------------------------------------------------------------------- saving


def save_image(image: Image.Image, outdir: Path, name: str, text: Mapping[str, str]) -> Path:
    """Save `image` as `outdir/name` with `text` as metadata; return the path written.

    An existing file is never overwritten: if `name` is taken, `stem_1.ext`, `stem_2.ext`, ...
    is used. The image is encoded into a temporary file (a dot-name ending in `.part`) in
    `outdir`, fsynced, and published with `os.link`, which fails instead of replacing an
    existing file, so no reader ever sees a half-written file under an image name. On any
    error (including Ctrl+C) the temporary file is removed.
    PNG: each `text` item becomes a tEXt chunk, or iTXt where it is not latin-1.
    WebP (name ending `.webp`): only `text["parameters"]` is kept, as EXIF UserComment.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"output file name {name!r} must be a plain file name; remove folders from --f")
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise UserError(f"--outdir {outdir}: is not a folder; give a folder path") from e
    except OSError as e:
        raise UserError(f"--outdir {outdir}: cannot create it ({e.strerror}); check the path and permissions") from e
    webp = name.lower().endswith(".webp")
    fd, tmp = _create_temp(outdir, name)
    try:
        with os.fdopen(fd, "wb") as f:
            _encode(image, f, webp, text)
            f.flush()
            os.fsync(f.fileno())
        final = _publish(tmp, outdir, name)
    except OSError as e:
        if e.errno is None:  # an encoder problem, not the file system: a bug
            raise
        raise UserError(write_failure(outdir, name, e)) from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(outdir)
    logger.debug("saved %s", final)
    return final


def _create_temp(outdir: Path, name: str) -> tuple[int, Path]:
    """Open a new hidden `.{name}.{random}.part` file in `outdir` (mode as the umask allows)."""
    while True:
        tmp = outdir / f".{name[:80]}.{secrets.token_hex(6)}.part"
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"--outdir {outdir}: cannot write there ({e.strerror}); check permissions") from e


def _encode(image: Image.Image, f, webp: bool, text: Mapping[str, str]) -> None:
    """Write the encoded image with its metadata to the open binary file `f`."""
    if webp:
        exif = Image.Exif()
        if "parameters" in text:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + text["parameters"].encode("utf-16-be")
        image.save(f, format="WEBP", quality=100, exif=exif.tobytes())
        return
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # Pillow falls back to iTXt for non-latin-1 values
    image.save(f, format="PNG", pnginfo=info)


def _candidate_names(name: str) -> Iterable[str]:
    """`name`, then `stem_1.ext`, `stem_2.ext`, ... (the extension kept as given)."""
    yield name
    stem, ext = os.path.splitext(name)
    for n in range(1, _MAX_NAME_TRIES):
        yield f"{stem}_{n}{ext}"


def _publish(tmp: Path, outdir: Path, name: str) -> Path:
    """Give the finished `tmp` its first free final name, without replacing any file."""
    for candidate in _candidate_names(name):
        final = outdir / candidate
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        if _publish_without_link(tmp, final):  # this file system has no hard links
            return final
    raise UserError(f"--outdir {outdir}: no free file name for {name}; move old images away")


def _publish_without_link(tmp: Path, final: Path) -> bool:
    """Fallback where hard links fail; False if `final` is taken.

    Windows `os.rename` refuses to replace an existing file. Elsewhere the name is reserved
    with O_EXCL (an empty file for an instant) and the finished file renamed over it.
    """
    if os.name == "nt":
        try:
            os.rename(tmp, final)
            return True
        except FileExistsError:
            return False
    try:
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    os.replace(tmp, final)
    return True


def _fsync_dir(folder: Path) -> None:
    """Persist the new directory entry where the platform allows it (POSIX only)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- metadata: writer

# Our --sampler names -> A1111 display names. dpmsolver (multistep, noise-prediction form)
# has no A1111 twin; "DPM++ 2M" is the same solver class and order. dpmsingle follows the
# mapping table in the diffusers scheduler docs (DPM++ SDE <-> DPMSolverSinglestepScheduler).
A1111_SAMPLER_NAMES: dict[str, str] = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
    "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsolver++_sde": "DPM++ 2M SDE", "dpmsingle": "DPM++ SDE", "unipc": "UniPC", "lcm": "LCM",
}


def a1111_sampler_name(sampler: str, karras: bool = False) -> str:
    """A1111's display name for one of our sampler names (`k_` prefix accepted).

    A `_karras` suffix or `karras=True` appends " Karras" ("DPM++ 2M Karras"), the form old
    and new A1111 versions, ComfyUI's importer and civitai all read. Unknown names are
    passed through unchanged so that an already-A1111 name survives.
    """
    base = sampler.strip()
    if base.lower().endswith("_karras"):
        base, karras = base[: -len("_karras")], True
    key = base.lower()
    name = A1111_SAMPLER_NAMES.get(key[2:] if key.startswith("k_") else key, base)
    return f"{name} Karras" if karras and not name.endswith(" Karras") else name


def a1111_quote(value: str) -> str:
    """A1111's `quote` rule: JSON-quote a value containing `,`, a newline or `:`."""
    if any(c in value for c in ",\n:"):
        return json.dumps(value, ensure_ascii=False)
    return value


def _number(value: object) -> str:
    """A number as A1111 shows it: `7` for 7.0, `7.5` for 7.5; other values via str()."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Everything written into one image's metadata.

    `sampler` is the CLI `--sampler` string (stored as-is under `sampler`, and translated
    for the A1111 line). `extra` holds further A1111 params in order (e.g. `Hires upscale`,
    `Hires steps`, `Lora hashes`); a Mapping is accepted and stored as a tuple of pairs.
    """

    prompt: str
    seed: int
    sampler: str
    steps: int
    scale: float
    width: int
    height: int
    negative_prompt: str | None = None
    negative_scale: float | None = None
    clip_prompt: str | None = None
    raw_prompt: str | None = None
    model_name: str | None = None
    model_hash: str | None = None
    clip_skip: int | None = None
    strength: float | None = None
    karras: bool = False
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.extra, Mapping):
            object.__setattr__(self, "extra", tuple(self.extra.items()))
        else:
            object.__setattr__(self, "extra", tuple((str(k), v) for k, v in self.extra))


def generation_text(record: ImageRecord) -> dict[str, str]:
    """PNG text items for one image: the original tool's keys, then A1111 `parameters`."""
    text = {
        "prompt": record.prompt,
        "seed": str(record.seed),
        "sampler": record.sampler,
        "steps": str(record.steps),
        "scale": str(record.scale),
    }
    if record.negative_prompt is not None:
        text["negative-prompt"] = record.negative_prompt
    if record.negative_scale is not None:
        text["negative-scale"] = str(record.negative_scale)
    if record.clip_prompt is not None:
        text["clip-prompt"] = record.clip_prompt
    if record.raw_prompt is not None:
        text["raw-prompt"] = record.raw_prompt
    text["parameters"] = a1111_parameters(record)
    return text


def a1111_parameters(record: ImageRecord) -> str:
    """The A1111 infotext: prompt, optional `Negative prompt:` part, then the params line."""
    params: list[tuple[str, object]] = [
        ("Steps", record.steps),
        ("Sampler", a1111_sampler_name(record.sampler, record.karras)),
        ("CFG scale", record.scale),
        ("Seed", record.seed),
        ("Size", f"{record.width}x{record.height}"),
        ("Model hash", record.model_hash),
        ("Model", record.model_name),
        ("Denoising strength", record.strength),
        ("Clip skip", record.clip_skip if record.clip_skip is not None and record.clip_skip > 1 else None),
        *record.extra,
    ]
    items = []
    for key, value in params:
        if value is None:
            continue
        shown = _number(value)
        items.append(key if key == shown else f"{key}: {a1111_quote(shown)}")
    negative = f"\nNegative prompt: {record.negative_prompt}" if record.negative_prompt else ""
    return f"{record.prompt}{negative}\n{', '.join(items)}".strip()


def lora_hashes_text(hashes: Iterable[tuple[str, str]]) -> str:
    """The `Lora hashes` value: `name: hash, ...` with `:` and `,` removed from names."""
    return ", ".join(f"{re.sub(r'[:,]', '', name)}: {h}" for name, h in hashes)


# ----------------------------------------------------------------------------- metadata: reader

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_A1111_DEFAULTS = {  # A1111's fill-ins for absent keys that have constant defaults
    "Clip skip": "1", "Hires resize-1": "0", "Hires resize-2": "0", "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "RNG": "GPU", "Schedule type": "Automatic",
}


def parse_a1111_parameters(text: str, *, with_defaults: bool = False) -> dict[str, str]:
    """Read an A1111 infotext the way A1111 reads it.

    Returns `Prompt`, `Negative prompt` and each `key: value` of the params line (all str);
    `WxH` values become `Key-1`/`Key-2`. The last line counts as params only when it holds
    at least three `key: value` items; otherwise it is prompt text. Each prompt line is
    stripped, as A1111 does. `with_defaults` adds A1111's fill-ins for absent constant keys.
    """
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _RE_PARAM.findall(last):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = _RE_IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    if with_defaults:
        for key, value in _A1111_DEFAULTS.items():
            result.setdefault(key, value)
    return result


def read_generation_text(path: Path) -> dict[str, str]:
    """All text metadata of an image file: PNG tEXt/zTXt/iTXt chunks in file order.

    For other formats, string `info` items; an EXIF UserComment (how A1111 stores WebP/JPEG
    infotext) is returned as `parameters` when there is no such item.
    """
    try:
        with Image.open(path) as im:
            check_image_header(im.size, str(path))
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            if not text:
                text = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
            comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file; check the path") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not an image or damaged ({e}); check the file") from e
    if "parameters" not in text and isinstance(comment, bytes):
        text["parameters"] = _decode_user_comment(comment)
    return text


def _decode_user_comment(raw: bytes) -> str:
    """EXIF UserComment: an 8-byte charset prefix, then UTF-16BE for UNICODE, else ASCII."""
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        return body.decode("utf-16-be", errors="replace")
    return body.decode("latin-1").rstrip("\x00")


# ----------------------------------------------------------------------------- hashes


def model_hash(path: Path) -> str:
    """A1111 `Model hash`: the first 10 hex digits of the whole file's SHA-256."""
    return _sha256_from(path, 0)[:10]


def addnet_hash_safetensors(path: Path) -> str:
    """SHA-256 (hex) of a safetensors file's tensor data, skipping its JSON header.

    This is the "addnet" hash A1111 uses for `Lora hashes` (first 12 digits there).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    if len(head) < 8:
        raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); replace it")
    return _sha256_from(path, int.from_bytes(head, "little") + 8)


def _sha256_from(path: Path, offset: int) -> str:
    """SHA-256 hex of the file from `offset` to its end, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    return digest.hexdigest()


# ----------------------------------------------------------------------------- image input


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


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, EXIF rotation applied; damage -> UserError.

    The size is checked from the header first (`library.limits.MAX_SIDE`), before decoding."""
    try:
        with Image.open(path) as im:
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
        with Image.open(path) as im:
            check_image_header(im.size, str(path))
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file; check the path") from e
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: far larger than {MAX_SIDE} pixels a side; make it smaller first") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not an image or damaged ({exception_text(e)}); replace or remove it") from e


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
