"""`--from_png FILE|DIR`: make pictures again from the settings in their metadata.

Writing: `run_record(args, parser)` is the `run-options` item every image of this tool carries
(`library.images.job_record` writes its `job-options`): each command-line option that decides
pixels and differs from its default, as JSON (paths made absolute). Options that only say where
prompts come from, how many images, where files go, or that a prompt line sets per image
(`--W`, `--steps`, `--seed`, ...; they are in `job-options`) are left out.

Reading: `expand(argv, parser)` reads each PNG (`library.images.infotext_reader`) and returns the
command line to parse: the PNG's run options, then the user's own (which win), and one prompt
line per PNG carrying the image's own settings (`--w --h --s --d --l ...`) minus those the user
gave on the command line (`--steps 30` beside `--from_png` replaces the PNG's steps; `--seed`
replaces its seed). The PNGs of a folder must share their run settings (one sampler, one Highres
fix, ...). What a PNG says that we cannot use is one warning line per file.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from library.errors import UserError
from library.images.infotext_reader import PngSettings, read_png_settings

logger = logging.getLogger(__name__)

#: options that are not recorded: prompt sources, counts, output, logging, per-image settings
NOT_RECORDED = {
    "help", "outdir", "prompt", "from_file", "from_module", "interactive", "no_preview", "W", "H", "steps", "scale",
    "negative_scale", "images_per_prompt", "n_iter", "seed", "iter_same_seed", "shuffle_prompts",
    "sequential_file_name", "skip_existing", "batch_size", "vae_batch_size", "console_log_level",
    "console_log_file", "console_log_simple", "prompter_module_args", "network_show_meta", "use_original_file_name",
    "highres_fix_save_1st", "image_path", "mask_path", "strength", "network_mul", "ds_depth_1", "ds_timesteps_1",
    "ds_depth_2", "ds_timesteps_2", "ds_ratio", "gradual_latent_timesteps", "gradual_latent_ratio",
    "gradual_latent_ratio_step", "gradual_latent_every_n_steps", "gradual_latent_s_noise",
    "gradual_latent_unsharp_params", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
    "from_png", "xyz", "prompt_matrix", "device", "tokenizer_cache_dir", "compile",
}
#: command-line option (dest) -> the prompt-line options it replaces when given beside --from_png
REPLACES = {
    "W": ("w",), "H": ("h",), "steps": ("s",), "scale": ("l",), "negative_scale": ("nl",), "strength": ("t",),
    "seed": ("d",), "subseed": ("vs",), "subseed_strength": ("vss",), "seed_resize_from_w": ("srw",),
    "seed_resize_from_h": ("srh",), "network_mul": ("am",), "ds_depth_1": ("dsd1",), "ds_timesteps_1": ("dst1",),
    "ds_depth_2": ("dsd2",), "ds_timesteps_2": ("dst2",), "ds_ratio": ("dsr",), "gradual_latent_timesteps": ("glt",),
    "gradual_latent_ratio": ("glr",), "gradual_latent_ratio_step": ("gls",),
    "gradual_latent_every_n_steps": ("gle",), "gradual_latent_s_noise": ("glsn",),
    "gradual_latent_unsharp_params": ("glus",),
}


def _absolute(value):
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def run_record(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The `run-options` JSON of this run (see the module docstring)."""
    record = {}
    for action in parser._actions:
        dest = action.dest
        if dest in NOT_RECORDED or not action.option_strings or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value != action.default and not (value in (None, [], ()) and action.default in (None, [], ())):
            record[dest] = _absolute(value)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def png_files(spec: str) -> list[Path]:
    """The PNG of `spec`, or the PNGs of a folder in name order."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        if not files:
            raise UserError(f"--from_png {spec}: the folder has no .png files")
        return files
    if not path.is_file():
        raise UserError(f"--from_png {spec}: no such file or folder")
    return [path]


def _given(argv: list[str], action: argparse.Action) -> bool:
    return any(token == opt or token.startswith(opt + "=") for token in argv for opt in action.option_strings)


def _escape(prompt: str) -> str:
    """A final prompt as prompt-line text: braces and bars literal again (`library.prompts.dynamic`)."""
    return prompt.replace("{", "\\{").replace("}", "\\}").replace("|", "\\|")


def prompt_line(settings: PngSettings, dropped: set[str]) -> str:
    """The prompt line that makes the PNG's image (its options minus `dropped`)."""
    line = dict(settings.line)
    tags = line.pop("tags", "")
    parts = [_escape(settings.prompt) + (f" {tags}" if tags else "")]
    if settings.negative is not None:
        parts.append(f"--n {settings.negative}".rstrip())
    parts += [f"--{name} {value}" for name, value in line.items() if name not in dropped]
    if settings.clip_prompt:
        parts.append(f"--c {settings.clip_prompt}")
    return " ".join(parts)


def _run_argv(run: dict[str, object], parser: argparse.ArgumentParser, user: list[str]) -> list[str]:
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for dest, value in run.items():
        action = by_dest.get(dest)
        if action is None or _given(user, action) or value is None:
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [option] if value else []
        elif isinstance(value, list):
            argv += [option, *map(str, value)] if value else []
        else:
            argv += [option, str(value)]
    return argv


def expand(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[tuple[str, str]]]:
    """(command line to parse, [(prompt line, file)]) for a command line with `--from_png`."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--from_png")
    known, _ = pre.parse_known_args(argv)
    if known.from_png is None:
        return argv, []
    settings = [read_png_settings(path) for path in png_files(known.from_png)]
    first = settings[0]
    for other in settings[1:]:
        if other.run != first.run:
            key = next(k for k in sorted(set(first.run) | set(other.run)) if first.run.get(k) != other.run.get(k))
            raise UserError(f"--from_png {known.from_png}: {first.path.name} and {other.path.name} differ in --{key} "
                            f"({first.run.get(key)} / {other.run.get(key)}); one run has one value: regenerate "
                            "them separately")
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    dropped = {name for dest, names in REPLACES.items() if dest in by_dest and _given(argv, by_dest[dest])
               for name in names}
    for s in settings:
        if s.ignored:
            logger.warning("%s (%s): not understood, ignored: %s", s.path, s.source, "; ".join(s.ignored))
    lines = [(prompt_line(s, dropped), f"{s.path} (metadata)") for s in settings]
    return [*_run_argv(first.run, parser, argv), *argv], lines
