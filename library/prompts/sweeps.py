"""X/Y/Z sweeps (`--xyz`) and the prompt matrix (`--prompt_matrix`) as prompt lines.

A sweep turns each prompt line into one line per cell: the line with the cell's settings
appended as prompt-line options (`--s 20 --l 7`), or with its text replaced (Prompt S/R). So a
cell is made like any line: batched with its neighbours where the settings allow, with its
own settings in its metadata, the same in a split run. `SweepCell` says which grid and which
cell each line is (`library.images.grids` draws the grids).

Axis syntax: `"NAME: v1, v2, ..."` (values split like CSV, so `"a, b"` in quotes is one value).
Numbers also as ranges: `a-b` (every integer), `a-b (+s)` / `a-b (-s)` (step s), `a-b [n]`
(n values, ends included). Names (case and spaces do not matter): `AXES` below.
Prompt S/R: the first value is searched in the prompt and negative prompt, each value replaces it.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, replace

from library.errors import UserError
from library.prompts.line_options import PROMPT_OPTIONS, PromptOptionError, format_prompt_line, parse_prompt_line
from library.records.webui_samplers import canonical_sampler

MAX_CELLS = 1000  # images of one sweep of one prompt line: a mistyped range must not run for days

#: axis name -> prompt-line option ("" for Prompt S/R)
AXES: dict[str, str] = {
    "steps": "s", "seed": "d", "cfg scale": "l", "cfg": "l", "scale": "l", "sampler": "sa",
    "denoising": "t", "strength": "t", "negative scale": "nl", "width": "w", "height": "h",
    "var. seed": "vs", "variation seed": "vs", "var. strength": "vss", "variation strength": "vss",
    "lora multiplier": "am", "network multiplier": "am", "hires scale": "hfs", "highres fix scale": "hfs",
    "deep shrink ratio": "dsr", "deep shrink depth": "dsd1", "deep shrink timesteps": "dst1",
    "gradual latent ratio": "glr", "gradual latent timesteps": "glt", "prompt s/r": "",
}
_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)"
                    r"(?:\s*\(([+-]\s*\d+(?:\.\d*)?)\)|\s*\[(\d+)\])?\s*$")
_BY_NAME = {option.name: option for option in PROMPT_OPTIONS}


@dataclass(frozen=True)
class Axis:
    """One axis: its name as written, the option it sets ("" for Prompt S/R) and its values as text."""

    name: str
    option: str
    values: tuple[str, ...]

    def label(self, value: str) -> str:
        return f"{self.name}: {value}"


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def parse_axis(text: str) -> Axis:
    """`"steps: 10-30 [3]"` -> Axis("steps", "s", ("10", "20", "30")); `UserError` for a bad one."""
    name, colon, rest = text.partition(":")
    if not colon or _key(name) not in AXES:
        known = ", ".join(sorted({k for k in AXES}))
        raise UserError(f'--xyz "{text}": unknown axis "{name.strip()}"; write "NAME: values" with NAME one of {known}')
    option = AXES[_key(name)]
    items = [v.strip() for v in next(csv.reader([rest], skipinitialspace=True), [])]
    values: list[str] = []
    for item in items:
        values += _expand(item, option, text) if option not in ("", "sa") else [item]
    values = [v for v in values if v != ""]
    if not values:
        raise UserError(f'--xyz "{text}": no values')
    if option == "sa":
        for value in values:
            canonical_sampler(value)
    for value in values if option not in ("", "sa") else ():
        try:
            notes = parse_prompt_line(f"x --{option} {value}").notes
        except PromptOptionError as exc:
            raise UserError(f'--xyz "{text}": {exc}') from None
        if notes:  # a value the prompt line would read otherwise (clamped, cut, left out): not a sweep value
            raise UserError(f'--xyz "{text}": {notes[0]}')
    return Axis(name.strip(), option, tuple(values))


def _expand(item: str, option: str, text: str) -> list[str]:
    """A value, or the values of a range."""
    match = _RANGE.match(item)
    if not match:
        return [item]
    start, end, step, count = match.groups()
    integer = _BY_NAME[option].kind.name.startswith("INT") if option in _BY_NAME else False
    number = int if integer and "." not in start + end + (step or "") else float
    a, b = number(start), number(end)
    if count is not None:
        n = int(count)
        if n < 1 or n > MAX_CELLS:
            raise UserError(f'--xyz "{text}": [{n}] must be 1 to {MAX_CELLS} values')
        points = [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]
        return [_show(round(p) if number is int else p) for p in points]
    delta = number(step.replace(" ", "")) if step else (1 if b >= a else -1)
    if delta == 0 or (b - a) * delta < 0:
        raise UserError(f'--xyz "{text}": the step of {item} never reaches its end')
    steps = math.floor((b - a) / delta + 1e-9)
    if steps + 1 > MAX_CELLS:
        raise UserError(f'--xyz "{text}": {item} has {steps + 1} values, at most {MAX_CELLS}')
    return [_show(a + delta * i) for i in range(steps + 1)]


def _show(value: float | int) -> str:
    if isinstance(value, float):
        value = round(value, 10)
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


@dataclass(frozen=True)
class SweepCell:
    """Where one generated line goes: grid `grid` (prompt line, Z value), column `x`, row `y`."""

    grid: int
    x: int
    y: int


@dataclass(frozen=True)
class GridPlan:
    """One grid: its title and the labels of its columns and rows."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[str, ...]


def check_cells(axes: list[Axis], lines: int = 1) -> None:
    """At most `MAX_CELLS` images per prompt line."""
    cells = math.prod(len(a.values) for a in axes)
    if cells > MAX_CELLS:
        sizes = " x ".join(str(len(a.values)) for a in axes)
        raise UserError(f"--xyz: {sizes} = {cells} cells per prompt line; at most {MAX_CELLS}")


def check_search(axes: list[Axis], texts: list[str]) -> None:
    """Each Prompt S/R's search string is in every line's prompt or negative prompt."""
    for axis in axes:
        if axis.option:
            continue
        search = axis.values[0]
        for text in texts:
            parsed = parse_prompt_line(text)
            if search not in parsed.prompt and search not in (parsed.overrides.negative_prompt or ""):
                raise UserError(f'--xyz "{axis.name}: ...": "{search}" is not in the prompt "{parsed.prompt}" nor in '
                                "its negative prompt; Prompt S/R replaces its first value")


def cell_line(text: str, settings: list[tuple[Axis, str]]) -> str:
    """The prompt line `text` with one cell's settings."""
    parsed = parse_prompt_line(text)
    for axis, value in settings:
        if not axis.option:
            search = axis.values[0]
            o = parsed.overrides
            negative = o.negative_prompt.replace(search, value) if o.negative_prompt is not None else None
            parsed = replace(parsed, prompt=parsed.prompt.replace(search, value),
                             overrides=replace(o, negative_prompt=negative))
        else:
            field = _BY_NAME[axis.option].field
            typed = getattr(parse_prompt_line(f"x --{axis.option} {value}").overrides, field)
            parsed = replace(parsed, overrides=replace(parsed.overrides, **{field: typed}))
    return format_prompt_line(parsed)


def sweep(texts: list[str], axes: list[Axis]) -> tuple[list[tuple[str, SweepCell]], list[GridPlan]]:
    """Every cell line of every prompt line (Z, then Y, then X, as the web UI orders them) and the grids."""
    x_axis, y_axis, z_axis = (axes + [None, None])[:3]
    xs = x_axis.values
    ys = y_axis.values if y_axis else ("",)
    zs = z_axis.values if z_axis else ("",)
    cells: list[tuple[str, SweepCell]] = []
    grids: list[GridPlan] = []
    for text in texts:
        for z in zs:
            title = parse_prompt_line(text).prompt + (f" ({z_axis.label(z)})" if z_axis else "")
            grids.append(GridPlan(title, tuple(x_axis.label(x) for x in xs),
                                  tuple(y_axis.label(y) for y in ys) if y_axis else ("",)))
            for row, y in enumerate(ys):
                for column, x in enumerate(xs):
                    chosen = [(x_axis, x)] + ([(y_axis, y)] if y_axis else []) + ([(z_axis, z)] if z_axis else [])
                    cells.append((cell_line(text, chosen), SweepCell(len(grids) - 1, column, row)))
    return cells, grids


def prompt_matrix(text: str) -> tuple[list[tuple[str, SweepCell]], list[GridPlan]]:
    """The web UI's prompt matrix: `base | a | b` -> every subset of the optional parts (the
    base always), 2**k images; the first half of the parts (rounded down) makes the columns."""
    parsed = parse_prompt_line(text)
    parts = [p.strip() for p in parsed.prompt.split("|")]
    base, optional = parts[0], parts[1:]
    if not optional:
        raise UserError(f'--prompt_matrix: the prompt "{parsed.prompt}" has no "|" parts to combine')
    if 2 ** len(optional) > MAX_CELLS:
        raise UserError(f"--prompt_matrix: {len(optional)} parts make {2 ** len(optional)} images; at most "
                        f"{MAX_CELLS}")
    across = len(optional) // 2 or 1
    columns = [", ".join(optional[i] for i in range(across) if bits >> i & 1) or "-" for bits in range(2**across)]
    rows_count = 2 ** (len(optional) - across)
    rows = [", ".join(optional[across + i] for i in range(len(optional) - across) if bits >> i & 1) or "-"
            for bits in range(rows_count)]
    cells = []
    for bits in range(2 ** len(optional)):
        chosen = [p for i, p in enumerate(optional) if bits >> i & 1]
        prompt = ", ".join([base, *chosen]) if base else ", ".join(chosen)
        line = format_prompt_line(replace(parsed, prompt=prompt))
        cells.append((line, SweepCell(0, bits % 2**across, bits >> across)))
    return cells, [GridPlan(base, tuple(columns), tuple(rows))]
