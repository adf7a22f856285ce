"""Generation metadata of images: what is written into each output and how it is read back.

`generation_text` writes both the original tool's PNG text keys and an AUTOMATIC1111-style
`parameters` chunk that web UIs and image sites import; for WebP outputs `webp_exif` carries `parameters` as an
EXIF UserComment. `parse_a1111_parameters` is an independent reader of that format, used to
prove that what we write is read back correctly, and with `read_generation_text` to take
prompts from img2img sources. No torch here: `tools/show_metadata.py` should start fast.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from library.errors import UserError
from library.records.limits import check_image_header

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"

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
class FeatureMetadata:
    """What features write into one image (`library.sampling.patches.Feature.metadata`): their own
    PNG text keys and their A1111 `parameters` fields, each in order; `+` joins two."""

    text: tuple[tuple[str, str], ...] = ()
    parameters: tuple[tuple[str, object], ...] = ()

    def __add__(self, other: FeatureMetadata) -> FeatureMetadata:
        return FeatureMetadata(self.text + other.text, self.parameters + other.parameters)


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
    a1111_prompt_suffix: str = ""  # e.g. `<lora:name:0.8>` tags: in `parameters` only, not in `prompt`
    feature_text: tuple[tuple[str, str], ...] = ()  # features' own PNG text keys (`FeatureMetadata.text`)

    def __post_init__(self) -> None:
        if isinstance(self.extra, Mapping):
            object.__setattr__(self, "extra", tuple(self.extra.items()))
        else:
            object.__setattr__(self, "extra", tuple((str(k), v) for k, v in self.extra))


def generation_text(record: ImageRecord) -> dict[str, str]:
    """PNG text items for one image: the original tool's keys, the features' keys, then A1111 `parameters`."""
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
    text.update(record.feature_text)
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
        shown = None if value is None else _number(value)
        if not shown:  # the web UI's reader drops a key with an empty value: not written at all
            continue
        items.append(key if key == shown else f"{key}: {a1111_quote(shown)}")
    negative = f"\nNegative prompt: {record.negative_prompt}" if record.negative_prompt else ""
    return f"{record.prompt}{record.a1111_prompt_suffix}{negative}\n{', '.join(items)}".strip()


def webp_exif(text: Mapping[str, str]) -> bytes:
    """The EXIF block of a WebP output: `text["parameters"]` as UserComment, in the UNICODE
    (UTF-16BE) form A1111 writes and reads outside PNG; other keys have no place there."""
    exif = Image.Exif()
    if "parameters" in text:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + text["parameters"].encode("utf-16-be")
    return exif.tobytes()


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
    `WxH` values become `Key-1`/`Key-2`; a key with an empty value (`Model: ,`) is left out,
    as A1111's reader leaves it out. The last line counts as params only when it holds
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
        if not value:  # the web UI fails on value[0] and skips the key
            continue
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
        with warnings.catch_warnings():  # the size is ours to check, from the header (a smaller limit than PIL's)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
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
