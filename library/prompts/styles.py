"""The web UI's prompt styles: `--styles styles.csv` and the prompt option `--style NAME[,NAME]`.

A styles file is CSV with a header naming the columns ``name``, ``prompt`` and
``negative_prompt`` (the web UI's `styles.csv`; other columns are ignored, rows without a name
skipped). A style is applied to a prompt as the web UI applies it: a style text containing
``{prompt}`` wraps the prompt (``{prompt}`` replaced by it), any other is appended after ``, ``
(an empty prompt or style text adds no comma). The negative prompt gets the style's
``negative_prompt`` the same way. Several styles apply in the order given. Styles are applied
to the line's text first, so a style may carry `{a|b}` variants, `<lora:...>` tags and
prompt editing like any prompt.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

COLUMNS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: str) -> dict[str, Style]:
    """The styles of `path` by name; a `UserError` with file:line for what is malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"--styles {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"--styles {path}: not UTF-8 text; save it as UTF-8") from None
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise UserError(f"--styles {path}: not CSV ({exc})") from None
    if not rows:
        raise UserError(f"--styles {path}: empty; expected a header line name,prompt,negative_prompt")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("name", "prompt") if c not in header]
    if missing:
        raise UserError(f"--styles {path}:1: the header has no column {', '.join(missing)} "
                        "(expected name,prompt,negative_prompt)")
    styles: dict[str, Style] = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise UserError(f"--styles {path}:{number}: {len(row)} fields but the header has {len(header)} "
                            "(quote texts that contain commas)")
        cells = dict(zip(header, row))
        name = cells.get("name", "").strip()
        if name:
            styles[name] = Style(name, cells.get("prompt", ""), cells.get("negative_prompt", ""))
    return styles


def merge(prompt: str, style: str) -> str:
    """`style` applied to `prompt`: `{prompt}` replaced, else joined with ", " (the web UI's rule)."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(names: str | None, prompt: str, negative: str | None, styles: Mapping[str, Style] | None,
                 source: str | None = None) -> tuple[str, str | None]:
    """`prompt` and `negative` with the styles `names` (comma-separated) applied in order."""
    if names is None:
        return prompt, negative
    if styles is None:
        raise UserError(f"--style {names}: no styles file; give --styles styles.csv")
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        style = styles.get(name)
        if style is None:
            known = ", ".join(sorted(styles)) or "none"
            raise UserError(f"--style {name}: no such style in {source or '--styles'} (styles: {known})")
        prompt = merge(prompt, style.prompt)
        if style.negative_prompt or negative is not None:
            negative = merge(negative or "", style.negative_prompt)
    return prompt, negative
