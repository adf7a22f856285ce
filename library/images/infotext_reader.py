"""Generation settings read back from a PNG, for `--from_png`: this tool's keys, the original
tool's keys, or an AUTOMATIC1111 / Forge `parameters` text.

`read_png_settings(path)` returns `PngSettings`: the prompt, negative prompt and CLIP prompt; the
image's own settings as prompt-line options (`line`: `w h s d l nl t am vs vss srw srh ...`);
the run's settings as command-line option names and values (`run`: `sampler`, `clip_skip`,
`highres_fix_scale`, ...); and `ignored`, what was read but cannot be used (`Face restoration:
CodeFormer`, an upscaler we do not have). `library.cli.regenerate` turns them into a run.

Which source wins: this tool's `job-options`/`run-options` keys (everything that decides the
image, `library.images.job_record`); else an A1111 `parameters` text; else the original tool's
keys (`prompt`, `seed`, `sampler`, `steps`, `scale`, `negative-prompt`, `negative-scale`,
`clip-prompt`; the size is the image's). A ComfyUI picture (a `workflow` key, or a `prompt` that
is a JSON graph) is refused in one line, as is a PNG without settings, a damaged file, and a
`parameters` text without its settings line or with a value that is not a number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from library.errors import UserError
from library.images.metadata import parse_a1111_parameters, read_generation_text
from library.records.webui_samplers import canonical_sampler


@dataclass
class PngSettings:
    """The settings of one PNG (see the module docstring)."""

    path: Path
    source: str  # "this tool", "the original tool", "A1111/Forge parameters"
    prompt: str
    negative: str | None = None
    clip_prompt: str | None = None
    line: dict[str, str] = field(default_factory=dict)
    run: dict[str, object] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def read_png_settings(path: Path) -> PngSettings:
    """The settings of the PNG at `path`; `UserError` (one line) when there are none to use."""
    text = read_generation_text(path)
    if "workflow" in text or _json_graph(text.get("prompt")):
        raise UserError(f"--from_png {path}: a ComfyUI picture (its settings are a node graph); --from_png reads "
                        "this tool's, the original tool's and A1111/Forge metadata only")
    if "job-options" in text and "prompt" in text:
        return _ours(path, text)
    if "parameters" in text:
        return _a1111(path, text["parameters"])
    if "prompt" in text and "seed" in text:
        return _original(path, text)
    raise UserError(f"--from_png {path}: no generation settings in its metadata (no parameters text, no prompt "
                    "and seed keys)")


def _json_graph(value: str | None) -> bool:
    if not value or not value.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(value), dict)
    except json.JSONDecodeError:
        return False


def _json_object(path: Path, text: str, key: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--from_png {path}: its {key} metadata is not a JSON object; the file was changed")
    return value


def _ours(path: Path, text: dict[str, str]) -> PngSettings:
    line = {str(k): str(v) for k, v in _json_object(path, text["job-options"], "job-options").items()}
    run = _json_object(path, text["run-options"], "run-options") if "run-options" in text else {}
    if "sampler" not in run and "sampler" in text:
        run["sampler"] = text["sampler"]
    ignored = []
    if "t" in line and "highres_fix_scale" not in run:
        ignored.append("an img2img picture: its source is not recorded (give --image_path)")
    return PngSettings(path, "this tool", text["prompt"], text.get("negative-prompt"), text.get("clip-prompt"),
                       line, run, ignored)


def _original(path: Path, text: dict[str, str]) -> PngSettings:
    with Image.open(path) as image:
        width, height = image.size
    line = {"w": str(width), "h": str(height), "s": _int(path, "steps", text.get("steps", "")),
            "d": _int(path, "seed", text["seed"])}
    if "scale" in text:
        line["l"] = _float(path, "scale", text["scale"])
    if "negative-scale" in text:
        line["nl"] = _float(path, "negative-scale", text["negative-scale"])
    run = {"sampler": _sampler(path, text.get("sampler", "ddim"), [])}
    return PngSettings(path, "the original tool", text["prompt"], text.get("negative-prompt"),
                       text.get("clip-prompt"), line, run)


def _int(path: Path, key: str, value: str) -> str:
    try:
        number = int(value.strip())
    except ValueError:
        raise UserError(f'--from_png {path}: "{key}: {value}" is not a whole number') from None
    return str(number)


def _float(path: Path, key: str, value: str) -> str:
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f'--from_png {path}: "{key}: {value}" is not a number')
    return repr(number)


def _sampler(path: Path, name: str, ignored: list[str], schedule: str | None = None) -> str:
    """Our sampler for a web-UI or our name; one we cannot make becomes the closest, noted in `ignored`."""
    if schedule == "Karras" and not name.lower().endswith("karras"):
        name = f"{name} Karras"
    try:
        return canonical_sampler(name)
    except UserError as exc:
        closest = str(exc).rsplit("--sampler ", 1)[-1] if "closest" in str(exc) else "ddim"
        ignored.append(f"Sampler: {name} (not available here; {closest} used)")
        return closest


#: A1111 fields that say which files made the image; they do not change a run (give --ckpt, --vae, LoRA options)
INFORMATION = {"Model", "Model hash", "VAE hash", "Lora hashes", "TI hashes", "Version", "Hashes", "User"}
#: fields whose A1111 default changes nothing here
NEUTRAL = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic", "Hires sampler": "Use same sampler",
           "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
           "Eta": "1", "Tiling": "False"}


def _a1111(path: Path, parameters: str) -> PngSettings:
    """An A1111/Forge infotext: every field it documents that we can use, the rest in `ignored`."""
    params = parse_a1111_parameters(parameters)
    fields = {k: v for k, v in params.items() if k not in ("Prompt", "Negative prompt")}
    if not fields:
        raise UserError(f"--from_png {path}: its parameters text has no settings line (like \"Steps: 20, "
                        "Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\")")
    ignored: list[str] = []
    take = fields.pop
    line: dict[str, str] = {}
    run: dict[str, object] = {}
    for key, option, read in (("Steps", "s", _int), ("Seed", "d", _int), ("CFG scale", "l", _float),
                              ("Size-1", "w", _int), ("Size-2", "h", _int), ("Variation seed", "vs", _int),
                              ("Variation seed strength", "vss", _float), ("Seed resize from-1", "srw", _int),
                              ("Seed resize from-2", "srh", _int)):
        if key in fields:
            line[option] = read(path, key, take(key))
    if "vs" in line and "vss" not in line:
        line.pop("vs")  # the web UI writes no strength when it is 0
    schedule = fields.pop("Schedule type", None)
    run["sampler"] = _sampler(path, take("Sampler", "Euler a"), ignored, schedule)
    if schedule not in (None, "Automatic", "Karras"):
        ignored.append(f"Schedule type: {schedule}")
    if "Clip skip" in fields:
        run["clip_skip"] = int(_int(path, "Clip skip", take("Clip skip")))
    if "ENSD" in fields:
        run["eta_noise_seed_delta"] = int(_int(path, "ENSD", take("ENSD")))
    if "Eta DDIM" in fields:
        run["ddim_eta"] = float(_float(path, "Eta DDIM", take("Eta DDIM")))
    rng = fields.pop("RNG", "GPU")
    if rng == "CPU":
        run["noise_device"] = "cpu"
    elif rng != "GPU":
        ignored.append(f"RNG: {rng}")
    _highres(path, fields, line, run, ignored)
    if "Denoising strength" in fields:
        strength = _float(path, "Denoising strength", take("Denoising strength"))
        if "highres_fix_scale" in run:
            line["t"] = strength
        else:
            ignored.append(f"Denoising strength: {strength} (img2img: give --image_path and --strength)")
    for key, value in fields.items():
        if key in INFORMATION or NEUTRAL.get(key) == value:
            continue
        if key == "VAE":
            ignored.append(f"VAE: {value} (give --vae)")
            continue
        ignored.append(f"{key}: {value}")
    return PngSettings(path, "A1111/Forge parameters", params["Prompt"], params["Negative prompt"] or None,
                       None, line, run, ignored)


def _highres(path: Path, fields: dict[str, str], line: dict[str, str], run: dict[str, object],
             ignored: list[str]) -> None:
    """A1111's Hires fix: `Size` is the 1st pass, `Hires upscale` or `Hires resize` the final size,
    `Hires steps` the 2nd pass's steps (here: `--steps`; the 1st pass's are `--highres_fix_steps`)."""
    scale = fields.pop("Hires upscale", None)
    resize = (fields.pop("Hires resize-1", None), fields.pop("Hires resize-2", None))
    if scale is None and resize == (None, None):
        return
    width, height = int(line.get("w", "512")), int(line.get("h", "512"))
    if resize[0] not in (None, "0") and resize[1] not in (None, "0"):
        final_w, final_h = int(_int(path, "Hires resize", resize[0])), int(_int(path, "Hires resize", resize[1]))
    else:
        factor = float(_float(path, "Hires upscale", scale or "1"))
        final_w, final_h = int(width * factor) // 8 * 8, int(height * factor) // 8 * 8
    if final_w <= width:
        return
    run["highres_fix_scale"] = width / final_w
    run["highres_fix_steps"] = int(line.get("s", "28"))
    hires_steps = fields.pop("Hires steps", None)
    if hires_steps not in (None, "0"):
        line["s"] = _int(path, "Hires steps", hires_steps)
    line["w"], line["h"] = str(final_w), str(final_h)
    upscaler = fields.pop("Hires upscaler", "Lanczos")
    if upscaler in ("Latent", "Latent (bilinear)"):
        run["highres_fix_latents_upscaling"] = "bilinear"
    elif upscaler == "Latent (bicubic)":
        run["highres_fix_latents_upscaling"] = "bicubic"
    elif upscaler != "Lanczos":
        ignored.append(f"Hires upscaler: {upscaler} (Lanczos used)")
