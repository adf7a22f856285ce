"""Prompt-line options (``--n``, ``--w``, ``--d`` ...): one table and one pure parser.

A prompt line is a prompt followed by options, each written `` --name value`` as the
manual says ("put spaces before and after the prompt option"), e.g.::

    1girl, (smile:1.2) --n lowres, bad hands --w 960 --h 640 --s 28 --d 1,2

`PROMPT_OPTIONS` is the single source of truth: the parser reads it, and so do the
``--help`` text (`prompt_options_help`) and `format_prompt_line`, its inverse
(which the tests use to check that every option round-trips).

Rules and decisions:

- An option starts at ``--`` that follows a space and is followed by a non-space
  character, as the original splits the line at `` --``: ``--n x`` at the very start of
  the line, ``a\t--w 8`` (after a tab), ``a--b`` and a lone ``--`` are prompt text. An
  option inside a ``{...}`` variant group is prompt text too, so that a group may hold
  `` --`` (see `library.prompts.dynamic`); an unclosed ``{`` therefore hides the options
  after it, and `library.prompts.dynamic.pick_variants` then reports the brace.
- Names are case-insensitive (``--W 512`` is ``--w 512``). The name ends at the first
  whitespace; the value is the rest, stripped. The prompt is stripped too.
- Text options (``--n``, ``--c``) may be empty (``--n`` alone sets an empty negative
  prompt); every other option needs a value.
- Numbers are read as the original reads them: the longest run at the start of the value
  of digits (``--w --h --s``), of digits and ``.`` (the other numbers) or of digits, ``.``,
  ``-`` and ``,`` (``--am``), converted with ``int``/``float``. So ``--w 64abc`` is 64,
  ``--l 1e3`` is 1 and ``--s 28.0`` is 28, each with a note; a value that does not start
  with such a run (``--l -3``, ``--l nan``) or that does not convert (``--glt 750.0``,
  ``--l 1.2.3``) leaves the option out, with a note. ``--d`` keeps its strict reading
  (comma-separated integers, spaces around items allowed, empty items not).
- `PromptLine.notes` holds those notes; the caller logs them with the file and line.
- Width and height must be positive multiples of 8: an error, not a silent rounding,
  so the image size is always what the line says (the original's pipeline also
  refuses other sizes), at most 8192. Steps are clamped to 1..1000 (as the original, with a
  note), seeds 0..2**32 - 1 (`library.records.limits`;
  the sampler's own step range is checked when the line's images are made), strength in
  [0, 1], Deep Shrink depths in 0..8 (the manual's range), timesteps >= 0, Gradual Latent
  interval >= 1. Integers have at most 20 digits (checked before converting them).
- A malformed value raises `PromptOptionError`; the caller reports it with the line and
  skips that line. An unknown option is kept in `PromptLine.unknown` (the caller warns
  with the file and line, and the line runs without it, as the original, which ignores
  it silently).
- SDXL's size options (``--oh --ow --nh --nw --ct --cl``, `SDXL_PROMPT_OPTIONS`) are integers:
  original sizes at least 1, crops at least 0; on an SD 1.x/2.x model the caller warns that
  they are ignored.
- ``--nl none`` (the original's) turns the negative scale off for the line
  (`PromptLine.negative_scale_off`).
- An option given twice keeps the last value, except ``--d``, which keeps the first (the
  original searches the line for the first `` --d ``), with a note.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

from library.errors import UserError
from library.messages import quoted
from library.records.limits import MAX_CONDITIONING_SIZE, MAX_DIGITS, MAX_SEED, MAX_SIDE, MAX_STEPS

logger = logging.getLogger(__name__)


class PromptOptionError(UserError):
    """A prompt-line option that is unknown or has a malformed value."""

    def __init__(self, message: str, option: str, value: str | None) -> None:
        super().__init__(message)
        self.option = option
        self.value = value


class OptionKind(enum.Enum):
    """How an option's value is read; the value is the kind's description for messages."""

    TEXT = "text"
    NAME = "a non-empty text"
    INT = "an integer"
    FLOAT = "a number"
    INT_LIST = "comma-separated integers"
    FLOAT_LIST = "comma-separated numbers"


@dataclass(frozen=True)
class PromptOption:
    """One row of the table: ``--name`` sets `field` of `PromptOverrides`.

    `minimum`/`maximum` are inclusive bounds and `multiple_of` a step, checked on each
    number (each item of a list); `example` is a valid value for messages and help.
    `lead` is the original's pattern for the value's leading number (None: the kind's
    default, `LEADS`; ``""``: read the whole value strictly); `clamp` brings a number
    outside the bounds to the nearest one (with a note) instead of refusing the line.
    """

    name: str
    kind: OptionKind
    field: str
    help: str
    example: str
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    lead: str | None = None
    clamp: bool = False


#: The original's pattern for the leading number of each kind of value.
LEADS: dict[OptionKind, str] = {
    OptionKind.INT: r"\d+",
    OptionKind.FLOAT: r"[\d.]+",
    OptionKind.FLOAT_LIST: r"[\d.\-,]+",
}
_DOTTED = r"[\d.]+"  # the original reads Deep Shrink and Gradual Latent integers so: "3.0" does not convert


PROMPT_OPTIONS: tuple[PromptOption, ...] = (
    PromptOption("n", OptionKind.TEXT, "negative_prompt", "negative prompt", "lowres, bad hands"),
    PromptOption("w", OptionKind.INT, "width", "image width", "768", minimum=8, maximum=MAX_SIDE, multiple_of=8),
    PromptOption("h", OptionKind.INT, "height", "image height", "512", minimum=8, maximum=MAX_SIDE, multiple_of=8),
    PromptOption("s", OptionKind.INT, "steps", "number of sampling steps", "28", minimum=1, maximum=MAX_STEPS,
                 clamp=True),
    PromptOption(
        "d", OptionKind.INT_LIST, "seeds", "seed of each image of the line (-1: a random one)", "1,2,3,4", minimum=-1,
        maximum=MAX_SEED, lead="",
    ),
    PromptOption("l", OptionKind.FLOAT, "scale", "guidance scale", "7.5"),
    PromptOption(
        "t", OptionKind.FLOAT, "strength", "img2img strength", "0.6", minimum=0, maximum=1
    ),
    PromptOption("nl", OptionKind.FLOAT, "negative_scale", "guidance scale of the negative prompt", "5"),
    PromptOption(
        "am", OptionKind.FLOAT_LIST, "network_multipliers",
        "multiplier of each additional network", "0.8,0.5",
    ),
    PromptOption("c", OptionKind.TEXT, "clip_prompt", "prompt for CLIP guidance", "a red car"),
    PromptOption("f", OptionKind.NAME, "file_name", "output file name", "portrait_001.png"),
    PromptOption(
        "glt", OptionKind.INT, "gradual_latent_timesteps",
        "Gradual Latent: timestep to start enlarging the latent", "650", minimum=0, lead=_DOTTED,
    ),
    PromptOption(
        "glr", OptionKind.FLOAT, "gradual_latent_ratio",
        "Gradual Latent: initial latent size ratio", "0.5",
    ),
    PromptOption(
        "gls", OptionKind.FLOAT, "gradual_latent_ratio_step",
        "Gradual Latent: ratio added at each enlargement", "0.125",
    ),
    PromptOption(
        "gle", OptionKind.INT, "gradual_latent_every_n_steps",
        "Gradual Latent: steps between enlargements", "3", minimum=1, lead=_DOTTED,
    ),
    PromptOption(
        "glsn", OptionKind.FLOAT, "gradual_latent_s_noise",
        "Gradual Latent: noise multiplier of the enlarging steps", "1.0",
    ),
    PromptOption(
        "glus", OptionKind.NAME, "gradual_latent_unsharp_params",
        "Gradual Latent: unsharp mask ksize,sigma,strength[,target_x]", "3,0.5,0.5,1",
    ),
    PromptOption(
        "dsd1", OptionKind.INT, "ds_depth_1", "Deep Shrink depth 1 (0 to 3 for SD 1.x/2.x, 0 to 8 for SDXL)", "3",
        minimum=0, maximum=8, lead=_DOTTED,
    ),
    PromptOption(
        "dst1", OptionKind.INT, "ds_timesteps_1", "Deep Shrink: apply depth 1 until this timestep",
        "650", minimum=0, lead=_DOTTED,
    ),
    PromptOption(
        "dsd2", OptionKind.INT, "ds_depth_2", "Deep Shrink depth 2 (0 to 3 for SD 1.x/2.x, 0 to 8 for SDXL)", "1",
        minimum=0, maximum=8, lead=_DOTTED,
    ),
    PromptOption(
        "dst2", OptionKind.INT, "ds_timesteps_2", "Deep Shrink: apply depth 2 until this timestep",
        "650", minimum=0, lead=_DOTTED,
    ),
    PromptOption("dsr", OptionKind.FLOAT, "ds_ratio", "Deep Shrink downsampling ratio", "0.5"),
    PromptOption("oh", OptionKind.INT, "original_height", "SDXL: original height conditioned on", "1024",
                 minimum=1, maximum=MAX_CONDITIONING_SIZE),
    PromptOption("ow", OptionKind.INT, "original_width", "SDXL: original width conditioned on", "1024",
                 minimum=1, maximum=MAX_CONDITIONING_SIZE),
    PromptOption("nh", OptionKind.INT, "original_height_negative", "SDXL: original height of the negative prompt",
                 "512", minimum=1, maximum=MAX_CONDITIONING_SIZE),
    PromptOption("nw", OptionKind.INT, "original_width_negative", "SDXL: original width of the negative prompt",
                 "512", minimum=1, maximum=MAX_CONDITIONING_SIZE),
    PromptOption("ct", OptionKind.INT, "crop_top", "SDXL: crop top conditioned on", "0", minimum=0,
                 maximum=MAX_CONDITIONING_SIZE),
    PromptOption("cl", OptionKind.INT, "crop_left", "SDXL: crop left conditioned on", "0", minimum=0,
                 maximum=MAX_CONDITIONING_SIZE),
    PromptOption("vs", OptionKind.INT, "subseed", "variation seed of the line's first image (+1 per image)", "1234",
                 minimum=0, maximum=MAX_SEED),
    PromptOption("vss", OptionKind.FLOAT, "subseed_strength", "variation seed strength (0: the seed, 1: the "
                 "variation seed)", "0.1", minimum=0, maximum=1),
    PromptOption("srw", OptionKind.INT, "seed_resize_from_w", "seed resize from this width", "512", minimum=8,
                 maximum=MAX_SIDE, multiple_of=8),
    PromptOption("srh", OptionKind.INT, "seed_resize_from_h", "seed resize from this height", "512", minimum=8,
                 maximum=MAX_SIDE, multiple_of=8),
    PromptOption("sa", OptionKind.NAME, "sampler", "sampler of the line's images (ours or the web UI's name)",
                 "euler_a"),
    PromptOption("hfs", OptionKind.FLOAT, "highres_scale", "Highres fix scale of the line's images (with "
                 "--highres_fix_scale)", "0.5", minimum=0.05, maximum=1),
    PromptOption("style", OptionKind.NAME, "styles", "styles of the --styles file to apply, comma-separated",
                 "Cinematic,Film grain"),
)

_BY_NAME: dict[str, PromptOption] = {option.name: option for option in PROMPT_OPTIONS}

#: The prompt options of SDXL's size conditioning (ignored, with a warning, on SD 1.x/2.x).
SDXL_PROMPT_OPTIONS = ("oh", "ow", "nh", "nw", "ct", "cl")


@dataclass(frozen=True)
class PromptOverrides:
    """What one prompt line overrides; None where the line does not say."""

    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seeds: tuple[int, ...] | None = None
    scale: float | None = None
    strength: float | None = None
    negative_scale: float | None = None
    network_multipliers: tuple[float, ...] | None = None
    clip_prompt: str | None = None
    file_name: str | None = None
    gradual_latent_timesteps: int | None = None
    gradual_latent_ratio: float | None = None
    gradual_latent_ratio_step: float | None = None
    gradual_latent_every_n_steps: int | None = None
    ds_depth_1: int | None = None
    ds_timesteps_1: int | None = None
    ds_depth_2: int | None = None
    ds_timesteps_2: int | None = None
    ds_ratio: float | None = None
    gradual_latent_s_noise: float | None = None
    gradual_latent_unsharp_params: str | None = None
    original_height: int | None = None
    original_width: int | None = None
    original_height_negative: int | None = None
    original_width_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    subseed: int | None = None
    subseed_strength: float | None = None
    seed_resize_from_w: int | None = None
    seed_resize_from_h: int | None = None
    sampler: str | None = None
    highres_scale: float | None = None
    styles: str | None = None  # `--style NAME[,NAME]` (`library.prompts.styles`)


@dataclass(frozen=True)
class PromptLine:
    """A prompt line split into its prompt text and its option overrides."""

    prompt: str
    overrides: PromptOverrides
    unknown: tuple[str, ...] = ()  # options not in the table, as written ("--zz 3"), in order
    negative_scale_off: bool = False  # `--nl none`: no negative scale for this line
    notes: tuple[str, ...] = ()  # values read other than as written, options left out (for a warning each)


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FIRST_WINS = ("d",)  # the original finds `--d` by searching the line: its first one counts


def parse_prompt_line(line: str) -> PromptLine:
    """Split `line` into its prompt and its options; raise `PromptOptionError` on a bad option."""
    starts = _option_starts(line)
    prompt = line[: starts[0]] if starts else line
    values: dict[str, Any] = {}
    unknown: list[str] = []
    notes: list[str] = []
    negative_scale_off = False
    for start, end in zip(starts, starts[1:] + [len(line)]):
        body = line[start + 2 : end]
        name, raw_value = _split_name(body)
        option = _BY_NAME.get(name.lower())
        if option is None:
            unknown.append("--" + body.strip())
            continue
        if option.field in values or (option.name == "nl" and negative_scale_off):
            which = "first" if option.name in _FIRST_WINS else "last"
            notes.append(f"prompt option --{option.name} given twice; the {which} value is used")
            if option.name in _FIRST_WINS:
                continue
        if option.name == "nl" and raw_value.strip().lower() == "none":
            values.pop(option.field, None)
            negative_scale_off = True
            continue
        value = _read_value(option, raw_value.strip(), notes)
        if value is None:
            continue
        if option.name == "nl":
            negative_scale_off = False
        values[option.field] = value
    return PromptLine(prompt.strip(), PromptOverrides(**values), tuple(unknown), negative_scale_off, tuple(notes))


def without_seeds(line: str) -> str:
    """`line` without its `--d ...` options: the `raw-prompt` metadata key, as the original writes
    it (the seed has its own key, and a line copied back must not pin the seeds again)."""
    starts = _option_starts(line)
    text = line
    for start, end in reversed(list(zip(starts, starts[1:] + [len(line)]))):
        if _split_name(line[start + 2:end])[0].lower() == "d":
            rest = text[end:].lstrip()
            text = text[:start].rstrip() + (" " + rest if rest else "")
    return text


def unknown_option_message(written: str) -> str:
    """The warning for an option `parse_prompt_line` did not know (`written` as "--zz 3")."""
    name = written.split(None, 1)[0]
    known = ", ".join("--" + option.name for option in PROMPT_OPTIONS)
    return f'unknown prompt option {name} (in "{written}") ignored, the line runs without it; known: {known}'


def _split_name(body: str) -> tuple[str, str]:
    """Split an option body (``"w 512"``) at its first whitespace into name and value."""
    parts = body.split(None, 1)
    return parts[0], parts[1] if len(parts) > 1 else ""


def _option_starts(line: str) -> list[int]:
    """Positions of the ``--`` that start options (after a space), outside ``{...}`` groups.

    Escapes follow `library.prompts.dynamic`: ``\\{`` ``\\}`` ``\\|`` ``\\\\`` are two
    characters that open or close nothing.
    """
    starts: list[int] = []
    depth = 0
    position = 0
    while position < len(line):
        char = line[position]
        if char == "\\" and line[position + 1 : position + 2] in ("{", "}", "|", "\\"):
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif (
            depth == 0
            and line.startswith("--", position)
            and position > 0
            and line[position - 1] == " "
            and position + 2 < len(line)
            and not line[position + 2].isspace()
        ):
            starts.append(position)
            position += 2
            continue
        position += 1
    return starts


def _read_value(option: PromptOption, raw: str, notes: list[str]) -> Any:
    """Turn one option's stripped text into its typed value, checking the table's bounds;
    None (with a note) where the original would leave the option out."""
    if option.kind is OptionKind.TEXT:
        return raw
    if not raw:
        raise PromptOptionError(
            f"prompt option --{option.name} needs a value (e.g. --{option.name} {option.example})",
            option="--" + option.name,
            value=None,
        )
    if option.kind is OptionKind.NAME:
        return raw
    lead = LEADS.get(option.kind, "") if option.lead is None else option.lead
    text = raw
    if lead:
        match = re.match(lead, raw)
        if match is None:
            notes.append(f'prompt option --{option.name} "{quoted(raw)}" ignored: it does not start with '
                         f"a number the original reads (e.g. --{option.name} {option.example})")
            return None
        text = match.group(0)
        if not _converts(option, text):
            notes.append(f'prompt option --{option.name} "{quoted(raw)}" ignored: "{quoted(text)}" is not '
                         f"{option.kind.value} (e.g. --{option.name} {option.example})")
            return None
    if option.kind in (OptionKind.INT, OptionKind.FLOAT):
        number = _read_number(option, text, raw, notes)
    else:
        items = [item.strip() for item in text.split(",")]
        number = tuple(_read_number(option, item, raw, notes) for item in items)
    if text != raw:
        notes.append(f'prompt option --{option.name} "{quoted(raw)}" read as {_format_value(number)} '
                     f'(only the leading "{quoted(text)}" is read, as the original does)')
    return number


def _converts(option: PromptOption, text: str) -> bool:
    """True when the original's ``int``/``float`` takes every item of `text`."""
    items = text.split(",") if option.kind in (OptionKind.INT_LIST, OptionKind.FLOAT_LIST) else [text]
    pattern = _INT if option.kind in (OptionKind.INT, OptionKind.INT_LIST) else _FLOAT
    return all(pattern.fullmatch(item) for item in items)


def _read_number(option: PromptOption, text: str, raw: str, notes: list[str]) -> int | float:
    """Read one number of `option` (`raw` is the whole value, for the message)."""
    integer = option.kind in (OptionKind.INT, OptionKind.INT_LIST)
    pattern = _INT if integer else _FLOAT
    if not pattern.fullmatch(text):
        _fail(option, f"expects {option.kind.value}", raw)
    too_long = integer and len(text.lstrip("+-").lstrip("0")) > MAX_DIGITS
    huge = (-1 if text.startswith("-") else 1) * 10**MAX_DIGITS  # stands in for a number too long to convert
    number: int | float = huge if too_long else int(text) if integer else float(text)
    if too_long and option.maximum is None:
        _fail(option, f"expects {option.kind.value} of at most {MAX_DIGITS} digits", raw)
    if not math.isfinite(number):
        _fail(option, f"expects {option.kind.value}", raw)
    if option.clamp and option.minimum is not None and option.maximum is not None:
        clamped = min(max(number, type(number)(option.minimum)), type(number)(option.maximum))
        if clamped != number:
            notes.append(f"prompt option --{option.name} {quoted(text)} read as {clamped} (the original keeps "
                         f"it within {_show(option.minimum)} to {_show(option.maximum)})")
        return clamped
    if option.multiple_of and (number <= 0 or number % option.multiple_of):
        _fail(option, f"expects a positive multiple of {option.multiple_of}", raw)
    each = "each value" if option.kind in (OptionKind.INT_LIST, OptionKind.FLOAT_LIST) else "a value"
    if option.minimum is not None and option.maximum is not None:
        if not option.minimum <= number <= option.maximum:
            _fail(option, f"expects {each} from {_show(option.minimum)} to {_show(option.maximum)}", raw)
    elif option.minimum is not None and number < option.minimum:
        _fail(option, f"expects {each} of at least {_show(option.minimum)}", raw)
    return number


def _show(bound: float) -> str:
    """A bound as the user would write it (``1`` not ``1.0``)."""
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _fail(option: PromptOption, problem: str, raw: str) -> NoReturn:
    """Raise the one-line error for a malformed value of `option`."""
    raise PromptOptionError(
        f'prompt option --{option.name} {problem}, got "{quoted(raw)}" '
        f"(e.g. --{option.name} {option.example})",
        option="--" + option.name,
        value=raw,
    )


def format_prompt_line(line: PromptLine) -> str:
    """Write `line` back as text that `parse_prompt_line` reads to an equal `PromptLine`.

    Options come in table order; floats in their shortest exact form, without an exponent.
    A negative number is readable only where the original's pattern has ``-`` (``--am``). Text values are
    written as they are, so they round-trip when they hold no `` --``.
    """
    parts = [line.prompt]
    for option in PROMPT_OPTIONS:
        value = getattr(line.overrides, option.field)
        if value is None:
            continue
        parts.append(f"--{option.name} {_format_value(value)}".rstrip())
    if line.negative_scale_off:
        parts.append("--nl none")
    return " ".join(parts)


def _format_value(value: str | int | float | tuple[int | float, ...]) -> str:
    """An override value as option text: floats exact and without an exponent (the original
    reads ``1e-05`` as 1), in their shortest form."""
    if isinstance(value, tuple):
        return ",".join(_format_value(item) for item in value)
    if isinstance(value, float):
        text = format(Decimal(repr(value)), "f")
        return text if "." in text else text + ".0"
    return value if isinstance(value, str) else repr(value)


def prompt_options_help() -> str:
    """One line per option, for ``--help`` and the docs: ``--w INT  image width (e.g. --w 768)``."""
    metavars: dict[OptionKind, str] = {
        OptionKind.TEXT: "TEXT",
        OptionKind.NAME: "NAME",
        OptionKind.INT: "INT",
        OptionKind.FLOAT: "FLOAT",
        OptionKind.INT_LIST: "INT,...",
        OptionKind.FLOAT_LIST: "FLOAT,...",
    }
    heads = [f"--{option.name} {metavars[option.kind]}" for option in PROMPT_OPTIONS]
    width = max(map(len, heads))
    return "\n".join(
        f"{head.ljust(width)}  {option.help} (e.g. --{option.name} {option.example})"
        for head, option in zip(heads, PROMPT_OPTIONS)
    )
