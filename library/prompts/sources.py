"""Prompt sources and prompt lines -> Jobs.

Sources: `--prompt`, `--from_file` (one prompt per line; blank lines and `#` lines skipped),
`--from_module` (a Python file with `get_prompter(args, pipe, networks)`), `--interactive`
(`Type prompt:`; end of input ends the run), and with none of them the `--image_path`
sources' own metadata (`metadata_lines`). Each line's options (`--n --w --h --s --d --l
--nl ...`) are parsed by `library.prompts.line_options`; a malformed line is reported with its
number and skipped. Dynamic variants (`{a|b}`) are picked per image from its seed. The web UI's
dialect (docs/webui.md): a line's `--style` names are applied to its text first
(`library.prompts.styles`), and each image's `<lora:...>` / `<hypernet:...>` tags are cut from
its text into its Job (`library.prompts.extra_networks`); its chunk count covers every step's
text under prompt editing (`library.text.prompt_editing`).

img2img: `Defaults.width/height` are None when the size comes from each source image
(no `--W/--H`), and `strength` is the img2img (or Highres fix 2nd stage) strength that a
line's `--t` overrides; the source itself is attached by `library.sampling.img2img.SourceImages`.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import UserError
from library.images import input_images as image_io
from library.images import metadata as image_metadata
from library.images import output_files
from library.prompts.dynamic import expand_enumerations, pick_variants
from library.prompts.extra_networks import NetworkFiles, prompt_networks
from library.prompts.line_options import (
    SDXL_PROMPT_OPTIONS,
    parse_prompt_line,
    unknown_option_message,
    without_seeds,
)
from library.prompts.seeds import SeedSource, seeds_for_line
from library.prompts.styles import Style, apply_styles, read_styles
from library.prompts.variation import line_variations
from library.records.deep_shrink_settings import DeepShrink
from library.records.deep_shrink_settings import with_overrides as deep_shrink_overrides
from library.records.extra_networks import HypernetUse
from library.records.gradual_latent_settings import GradualLatent, parse_unsharp
from library.records.gradual_latent_settings import with_overrides as gradual_latent_overrides
from library.records.jobs import Job
from library.records.options import Options
from library.records.size_conditioning import SizeConditioning
from library.records.variation_settings import VariationDefaults
from library.records.webui_samplers import canonical_sampler
from library.text.prompt_editing import distinct_texts
from library.text.weighting import split_and
from library.user_code import import_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    """Per-image settings from the command line, which prompt options override."""

    width: int | None  # None: the img2img source's width
    height: int | None
    steps: int
    scale: float
    negative_scale: float | None
    images_per_prompt: int
    network_multipliers: tuple[float, ...] | None = None
    strength: float | None = None  # None: txt2img, where `--t` means nothing
    deep_shrink: DeepShrink | None = None
    gradual_latent: GradualLatent | None = None
    regional_networks: int = 0  # regional LoRA: networks that each need a prompt part (`library.images.region_masks`)
    merged_networks: int = 0  # networks merged into the model (`--am` cannot change them)
    sizes: SizeConditioning | None = None  # SDXL's size conditioning; None: the model has none (SD 1.x/2.x)
    # where `<lora:...>` / `<hypernet:...>` tags find their files (`library.prompts.extra_networks`)
    network_files: NetworkFiles = field(default_factory=NetworkFiles, compare=False)
    hypernetworks: tuple[HypernetUse, ...] = ()  # `--hypernetwork` files: every image's
    styles: dict[str, Style] | None = field(default=None, compare=False)  # `--styles` (a line's `--style` picks)
    styles_file: str | None = None  # its path, for messages
    variation: VariationDefaults = VariationDefaults()  # `--subseed` ... (`library.prompts.variation`)
    highres: bool = False  # `--highres_fix_scale` given (a line's `--hfs` changes it)

    @classmethod
    def from_options(cls, options: Options, sdxl: bool = False) -> Defaults:
        """The command line's defaults; `sdxl`: the model has SDXL's size conditioning."""
        g, img2img = options.generation, options.sources.image_path is not None
        muls = tuple(options.networks.multipliers or [1.0] * len(options.networks.modules)) or None
        width = g.width if g.width_given or not img2img else None
        height = g.height if g.height_given or not img2img else None
        from library.records.options import regional_lora

        regional = len(options.networks.modules) if regional_lora(options) else 0
        n = options.networks
        merged = len(n.modules) if n.merge else min(n.merge_n_models or 0, len(n.modules))
        return cls(width, height, g.steps, g.scale, g.negative_scale, g.images_per_prompt, muls, _strength(options),
                   deep_shrink=g.deep_shrink, gradual_latent=g.gradual_latent, regional_networks=regional,
                   merged_networks=merged, network_files=_network_files(options),
                   hypernetworks=_run_hypernetworks(options),
                   styles=read_styles(options.dialect.styles) if options.dialect.styles else None,
                   styles_file=options.dialect.styles, variation=g.variation or VariationDefaults(),
                   highres=options.highres.scale is not None, sizes=(g.sizes or SizeConditioning()) if sdxl else None)


def _network_files(options: Options) -> NetworkFiles:
    """Tag folders: `--lora_dir` then the `--network_weights` files' folders; `--hypernetwork_dir`."""
    d = options.dialect
    weight_dirs = tuple(str(Path(w).parent) for w in options.networks.weights)
    return NetworkFiles(d.lora_dirs, d.hypernetwork_dirs, tuple(dict.fromkeys(weight_dirs)))


def _run_hypernetworks(options: Options) -> tuple[HypernetUse, ...]:
    """`--hypernetwork FILE ... --hypernetwork_mul M ...` (1 by default)."""
    d = options.dialect
    muls = d.hypernetwork_muls or (1.0,) * len(d.hypernetworks)
    return tuple(HypernetUse(Path(f).stem, f, float(m)) for f, m in zip(d.hypernetworks, muls))


def _strength(options: Options) -> float | None:
    """`--strength` for img2img and the Highres fix 2nd stage (as the original; its 1st stage,
    when img2img, takes `--highres_fix_strength`, see `library.sampling.highres_fix`); None for txt2img."""
    if options.sources.image_path is not None or options.highres.scale:
        return options.generation.strength
    return None


@dataclass(frozen=True)
class Line:
    """One prompt line and where it came from (for error messages)."""

    text: str
    where: str
    image: str | None = None  # the img2img source this line's prompt was read from
    problem: str | None = None  # why the line cannot be read (too long): it is skipped with this


# --- sources --------------------------------------------------------------------------------


def read_prompt_file(path: str):
    """Non-blank, non-comment lines of a prompt file, streamed (`library.prompts.prompt_file`)."""
    from library.prompts.prompt_file import PromptFile

    return PromptFile(path)


def interactive_lines(read: Callable[[str], str] = input) -> Iterator[Line]:
    """Prompts typed at `Type prompt:` until end of input (Ctrl+D / Ctrl+Z Enter)."""
    number = 0
    while True:
        try:
            text = read("Type prompt: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        number += 1
        if text.strip():
            yield Line(text.strip(), f"interactive prompt {number}")


def load_prompter(path: str, args: argparse.Namespace, pipe: object, networks: list) -> Callable:
    """Import `--from_module` (the user's own file) and return its prompter."""
    module = import_file(path, "--from_module")
    if not hasattr(module, "get_prompter"):
        raise UserError(f"--from_module {path}: the module has no get_prompter(args, pipe, networks) function")
    prompter = module.get_prompter(args, pipe, networks)
    return prompter if callable(prompter) else list(prompter)  # an iterable serves every round


def module_lines(prompter, args, pipe, seeds: SeedSource, iter_seed: int | None,
                 images_per_prompt: int = 1) -> Iterator[Line]:
    """Lines from a prompter: an iterable of strings, or a callable returning None to stop,
    called as the original calls it: `prompter(args, pipe, seed_random, iter_seed,
    prompt_index, global_step)`, with the run's seed generator (a `random.Random`, so
    `seed_random.randint(...)` works and shares the image seeds' sequence, as the original),
    `prompt_index` counting this round's prompts from 0 and `global_step` the images asked for."""
    if not callable(prompter):
        for index, text in enumerate(prompter):
            yield Line(str(text), f"--from_module prompt {index + 1}")
        return
    index = 0
    while True:
        text = prompter(args, pipe, seeds.random, iter_seed, index, index * images_per_prompt)
        if text is None:
            return
        index += 1
        yield Line(str(text), f"--from_module prompt {index}")


def metadata_prompt(path: Path) -> str:
    """A source's prompt line from its metadata: `prompt --n negative-prompt` (this tool and
    the original write these keys), else an A1111 `parameters` text."""
    text = image_metadata.read_generation_text(path)
    if "prompt" in text:
        prompt, negative = text["prompt"], text.get("negative-prompt")
    elif "parameters" in text:
        params = image_metadata.parse_a1111_parameters(text["parameters"])
        prompt, negative = params["Prompt"], params["Negative prompt"] or None
    else:
        raise UserError(f"--image_path {path}: the image has no prompt in its metadata; give --prompt or --from_file")
    return f"{prompt} --n {negative}" if negative else prompt


def metadata_lines(image_path: str) -> list[Line]:
    """No prompt option given: one prompt line per `--image_path` source, read from its
    metadata, each tied to its source (so that source's images use it)."""
    paths = image_io.list_images(Path(image_path), "--image_path")
    return [Line(metadata_prompt(p), f"{p} (metadata)", image=str(p)) for p in paths]


# --- lines -> jobs ----------------------------------------------------------------------------


def jobs_for_line(
    line: Line,
    defaults: Defaults,
    seeds: SeedSource,
    iter_seed: int | None,
    chunk_count: Callable[..., int],
) -> Iterator[Job]:
    """The Jobs of one prompt line, made as they are taken (`--images_per_prompt 1000000000000`
    holds no list); a malformed line raises `UserError` at the first Job (caller skips it)."""
    if line.problem is not None:
        raise UserError(line.problem)
    parsed = parse_prompt_line(line.text)
    o = parsed.overrides
    styled, styled_negative = apply_styles(o.styles, parsed.prompt, o.negative_prompt, defaults.styles,
                                           defaults.styles_file)
    for written in parsed.unknown:
        logger.warning("%s: %s", line.where, unknown_option_message(written))
    for note in parsed.notes:
        logger.warning("%s: %s", line.where, note)
    if o.network_multipliers is not None:
        _warn_inert_am(defaults, line)
    multipliers = _line_multipliers(o.network_multipliers, defaults.network_multipliers)
    if o.file_name is not None:
        output_files.check_file_name(o.file_name)
    width, height = o.width or defaults.width, o.height or defaults.height
    for name, value in (("--w", width), ("--h", height)):
        if value is not None and value % 8:
            raise UserError(f"{name} {value}: must be a multiple of 8")
    strength = _line_strength(o.strength, defaults.strength, line)
    sampler = _line_sampler(o.sampler)
    if o.highres_scale is not None and not defaults.highres:
        logger.warning("%s: --hfs ignored: it changes the Highres fix scale (give --highres_fix_scale)", line.where)
    deep_shrink = deep_shrink_overrides(defaults.deep_shrink, o)
    unsharp = parse_unsharp(o.gradual_latent_unsharp_params, "--glus")
    gradual_latent = gradual_latent_overrides(defaults.gradual_latent, o, unsharp)
    sizes = _line_sizes(defaults.sizes, o, line)
    for prompt in expand_enumerations(styled):
        drawn = seeds_for_line(seeds, defaults.images_per_prompt, list(o.seeds) if o.seeds else None, iter_seed)
        for seed, variation in zip(*line_variations(drawn, defaults.variation, o, bool(o.seeds))):
            text, tagged = prompt_networks(pick_variants(prompt, seed), defaults.network_files)
            negative, negative_tagged = prompt_networks(pick_variants(styled_negative or "", seed),
                                                        defaults.network_files)
            tagged += negative_tagged
            parts = split_and(text)
            if defaults.regional_networks > len(parts):
                raise UserError(f"{defaults.regional_networks} networks are loaded for regional LoRA but the prompt "
                                f"has {len(parts)} part(s); split it with ' AND ' into at least one part per network")
            yield (
                Job(
                    prompt=text,
                    negative_prompt=negative,
                    seed=seed,
                    width=width,
                    height=height,
                    steps=o.steps or defaults.steps,
                    scale=o.scale if o.scale is not None else defaults.scale,
                    negative_scale=_line_negative_scale(parsed.negative_scale_off, o.negative_scale,
                                                        defaults.negative_scale),
                    chunks=chunk_count(*distinct_texts((*parts, negative), o.steps or defaults.steps)),
                    raw_prompt=without_seeds(line.text),  # always written, as the original: the line less --d
                    clip_prompt=o.clip_prompt,
                    file_name=o.file_name,
                    network_multipliers=multipliers,
                    strength=strength,
                    deep_shrink=deep_shrink,
                    gradual_latent=gradual_latent,
                    prompt_parts=tuple(parts) if len(parts) > 1 else (),
                    sizes=sizes,
                    loras=tagged.loras,
                    hypernetworks=defaults.hypernetworks + tagged.hypernetworks,
                    variation=variation,
                    sampler=sampler,
                    highres_scale=o.highres_scale if defaults.highres else None,
                )
            )


def _warn_inert_am(defaults: Defaults, line: Line) -> None:
    """`--am` where it changes nothing: no networks, or (some) networks merged."""
    if defaults.network_multipliers is None:
        logger.warning("%s: --am ignored: no networks are loaded (--network_module/--network_weights)", line.where)
    elif defaults.merged_networks:
        logger.warning("%s: --am does not change the first %d network(s): they are merged into the model "
                       "(--network_merge / --network_merge_n_models)", line.where, defaults.merged_networks)


_SIZE_FIELDS = ("original_height", "original_width", "original_height_negative", "original_width_negative",
                "crop_top", "crop_left")


def _line_sizes(default: SizeConditioning | None, o, line: Line) -> SizeConditioning | None:
    """The line's SDXL size conditioning (`--oh --ow --nh --nw --ct --cl` over the command line's);
    on an SD 1.x/2.x model (`default` None) given ones are warned about and ignored."""
    given = {name: getattr(o, name) for name in _SIZE_FIELDS if getattr(o, name) is not None}
    if default is None:
        if given:
            names = " ".join(f"--{n}" for n, f in zip(SDXL_PROMPT_OPTIONS, _SIZE_FIELDS) if f in given)
            logger.warning("%s: %s ignored: SDXL only (this model is SD 1.x/2.x, without size conditioning); "
                           "the line runs without it", line.where, names)
        return None
    return default.with_overrides(**given)
def _line_sampler(name: str | None) -> str | None:
    """The line's `--sa` as our sampler name (the web UI's names too), None without it."""
    if name is None:
        return None
    try:
        return canonical_sampler(name)
    except UserError as exc:
        raise UserError(str(exc).replace("--sampler", "--sa")) from None


def _line_multipliers(given: tuple[float, ...] | None,
                      defaults: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """The line's `--am`: fewer values than networks are padded with the last one (as the
    original); more are refused (the line is skipped). Without networks it changes nothing."""
    if given is None or defaults is None:
        return defaults
    if len(given) > len(defaults):
        raise UserError(f"--am has {len(given)} values but {len(defaults)} networks are loaded")
    return given + given[-1:] * (len(defaults) - len(given))


def _line_negative_scale(off: bool, given: float | None, default: float | None) -> float | None:
    """The line's negative scale: none with `--nl none`, else its `--nl`, else `--negative_scale`."""
    if off:
        return None
    return given if given is not None else default


def _line_strength(given: float | None, default: float | None, line: Line) -> float | None:
    """The line's `--t`, where there is a strength to override (img2img, Highres fix)."""
    if given is None:
        return default
    if default is None:
        logger.warning("%s: --t ignored: it is the img2img strength (give --image_path or --highres_fix_scale)",
                       line.where)
        return None
    return given


def images_per_line(line: Line, per_prompt: int) -> int:
    """The images a prompt line makes: `per_prompt` for each prompt its `{e$$...}` groups expand
    to (the progress bar's total; a malformed line counts as one prompt)."""
    from library.prompts.dynamic import enumerated_count
    from library.prompts.line_options import PromptOptionError

    try:
        prompt = parse_prompt_line(line.text).prompt
    except PromptOptionError:
        prompt = line.text
    return enumerated_count(prompt) * per_prompt


def shuffled(lines: Iterable[Line], enabled: bool, rng=random) -> Iterable[Line]:
    """`--shuffle_prompts`: a new random order each round (from `rng`: the same on every rank
    of a split run, `library.run.distributed.Team.shuffler`); only then are the lines a list."""
    if not enabled:
        return lines
    copy = list(lines)
    rng.shuffle(copy)
    return copy
