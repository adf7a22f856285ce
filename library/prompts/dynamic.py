"""Dynamic prompt variants: ``{a|b|c}`` groups that make one prompt line into many.

The syntax is the one the original `gen_img.py` took over from the "Dynamic Prompts"
web UI extension:

- ``{a|b|c}`` picks one alternative per image.
- ``{e$$a|b|c}`` enumerates: one prompt per alternative; several ``{e$$...}`` groups
  give the cartesian product, the first group varying slowest.
- ``{2$$a|b|c}`` picks 2 distinct alternatives, in the random order they were drawn,
  joined with ``", "`` (the extension's default separator).
- ``{2$$ and $$a|b|c}`` joins with a custom separator, here `` and `` (spaces kept).
  The separator is plain text: no ``{ } | \\`` and no ``$$`` inside.
- ``{1-3$$a|b|c}`` picks a random count in 1..3 first; ``{-3$$...}`` means 1..3 and
  ``{2-$$...}`` means 2..(number of alternatives). A count above the number of
  alternatives is lowered to it; ``0$$`` gives the empty string.
- Groups nest: ``{a|{b|c}}``. Only the chosen alternatives are resolved.
- ``\\{`` ``\\}`` ``\\|`` are the literal characters in the output (backslash removed).
  ``\\\\`` is kept as the two characters, for the attention parser to read as one
  literal backslash, and does not escape what follows it. Any other backslash is kept.
- A ``|`` outside any group is ordinary text.

Decisions:

- Randomness is ``random.Random(seed)`` with the image's seed, so a seed alone
  re-creates its prompt, whatever the batch or the order of generation.
- An unclosed ``{`` or an unmatched ``}`` is a `DynamicPromptError` (a `UserError`)
  naming the column, not literal text: a silent literal brace would reach the text
  encoder and hide the typo. Write ``\\{`` / ``\\}`` for literal braces.
- A count range whose minimum is above its maximum (``{3-1$$...}``) is an error too.
- An ``e$$`` group nested in a random group is enumerated inside it:
  ``{a|{e$$b|c}}`` expands to ``{a|b}`` and ``{a|c}``.
- `pick_variants` on a line that still holds ``e$$`` groups picks one alternative of
  each at random (call `expand_enumerations` first to enumerate them).
- Enumerating more than `MAX_ENUMERATED_PROMPTS` prompts is an error, and so are groups
  nested more than `MAX_NESTING` deep (the parser is recursive).
- A count of more than 9 digits is read as 10**9: it is lowered to the number of
  alternatives anyway, and Python cannot convert thousands of digits.

Intended use: `expand_enumerations` once per prompt line, then `pick_variants` once per
image with that image's seed. Written by hand, as a small recursive-descent parser.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

from library.errors import UserError

logger = logging.getLogger(__name__)

#: The separator between the alternatives that a ``{2$$...}`` group picks.
DEFAULT_SEPARATOR = ", "
#: The most prompts that `expand_enumerations` makes from one line.
MAX_ENUMERATED_PROMPTS = 10_000
#: The deepest nesting of ``{...}`` groups in one prompt.
MAX_NESTING = 32
_MAX_COUNT_DIGITS = 9

_ESCAPABLE = "{}|"
# Group prefix: "e$$", or a count "2$$" / "1-3$$" / "-3$$" / "2-$$" / "-$$" with an optional
# separator "sep$$" after it.
_PREFIX = re.compile(
    r"(?:(?P<enum>e)|(?P<exact>\d+)|(?P<low>\d*)-(?P<high>\d*))\$\$"
    r"(?:(?P<sep>(?:(?!\$\$)[^{}|\\])*)\$\$)?"
)


class DynamicPromptError(UserError):
    """A malformed ``{...}`` variant group in a prompt."""


@dataclass(frozen=True)
class _Text:
    """Plain text: `raw` as written (escapes kept), `value` as it reads in the output."""

    raw: str
    value: str


@dataclass(frozen=True)
class _Group:
    """One ``{...}`` group; ``high=None`` means "the number of alternatives"."""

    prefix_raw: str
    enumerate_all: bool
    low: int
    high: int | None
    separator: str
    alternatives: tuple[tuple[_Node, ...], ...]


_Node = _Text | _Group


def has_dynamic_syntax(line: str) -> bool:
    """True when `line` holds a ``{...}`` group (escaped braces do not count)."""
    return any(isinstance(node, _Group) for node in _parse(line))


def expand_enumerations(line: str) -> list[str]:
    """Expand every ``{e$$...}`` group of `line`: one line per combination.

    The lines returned keep the random groups and the escapes as written, ready for
    `pick_variants`. A line with no ``e$$`` group comes back alone, unchanged.
    Raises `DynamicPromptError` for a malformed line or too many combinations.
    """
    nodes = _parse(line)
    count = _count_sequence(nodes)
    if count > MAX_ENUMERATED_PROMPTS:
        raise DynamicPromptError(
            f"the {{e$$...}} groups of the prompt make {count} prompts, more than "
            f"{MAX_ENUMERATED_PROMPTS}: use fewer alternatives or {{a|b}} random groups"
        )
    return _expand_sequence(nodes)


def enumerated_count(line: str) -> int:
    """How many prompts `expand_enumerations(line)` makes, without making them (1 for a
    malformed line, which is skipped as one line)."""
    try:
        return max(1, min(_count_sequence(_parse(line)), MAX_ENUMERATED_PROMPTS))
    except DynamicPromptError:
        return 1


def pick_variants(line: str, seed: int) -> str:
    """Resolve every group of `line` with ``random.Random(seed)``; the same seed, the same text.

    Escaped ``\\{ \\} \\|`` become the literal characters. Raises `DynamicPromptError`
    for a malformed line.
    """
    rng = random.Random(seed)
    return _pick_sequence(_parse(line), rng)


# --- parsing -------------------------------------------------------------------------


def _parse(line: str) -> tuple[_Node, ...]:
    """Parse a whole line into text and group nodes."""
    nodes, position = _parse_sequence(line, 0, in_group=False, depth=0)
    if position != len(line):  # pragma: no cover - _parse_sequence consumes all at top level
        raise AssertionError("top-level parse stopped early")
    return nodes


def _parse_sequence(line: str, position: int, in_group: bool, depth: int) -> tuple[tuple[_Node, ...], int]:
    """Read text and groups from `position` up to the end, or to a ``|``/``}`` inside a group."""
    nodes: list[_Node] = []
    raw: list[str] = []
    value: list[str] = []

    def flush() -> None:
        if raw:
            nodes.append(_Text("".join(raw), "".join(value)))
            raw.clear()
            value.clear()

    while position < len(line):
        char = line[position]
        following = line[position + 1] if position + 1 < len(line) else ""
        if char == "\\" and following and following in _ESCAPABLE:
            raw.append(char + following)
            value.append(following)
            position += 2
        elif char == "\\" and following == "\\":
            raw.append("\\\\")
            value.append("\\\\")
            position += 2
        elif char == "{":
            flush()
            group, position = _parse_group(line, position, depth + 1)
            nodes.append(group)
        elif char == "}" and not in_group:
            raise DynamicPromptError(
                f'unmatched "}}" at column {position + 1} of the prompt: remove it or '
                f'write "\\}}" for a literal brace'
            )
        elif char in "|}" and in_group:
            break
        else:
            raw.append(char)
            value.append(char)
            position += 1
    flush()
    return tuple(nodes), position


def _parse_group(line: str, start: int, depth: int) -> tuple[_Group, int]:
    """Parse the group whose ``{`` is at `start`; return it and the position after its ``}``."""
    if depth > MAX_NESTING:
        raise DynamicPromptError(
            f'the "{{" at column {start + 1} of the prompt nests variant groups more than {MAX_NESTING} deep; '
            f'flatten them or write "\\{{" for a literal brace'
        )
    position = start + 1
    prefix = _PREFIX.match(line, position)
    enumerate_all, low, high, separator, prefix_raw = False, 1, 1, DEFAULT_SEPARATOR, ""
    if prefix:
        prefix_raw = prefix.group(0)
        position = prefix.end()
        low, high, enumerate_all = _count_range(prefix, prefix_raw)
        if prefix.group("sep") is not None:
            separator = prefix.group("sep")
    alternatives: list[tuple[_Node, ...]] = []
    while True:
        alternative, position = _parse_sequence(line, position, in_group=True, depth=depth)
        alternatives.append(alternative)
        if position >= len(line):
            raise DynamicPromptError(
                f'unclosed "{{" at column {start + 1} of the prompt: close it with "}}" '
                f'or write "\\{{" for a literal brace'
            )
        position += 1
        if line[position - 1] == "}":
            break
    group = _Group(prefix_raw, enumerate_all, low, high, separator, tuple(alternatives))
    return group, position


def _count_range(prefix: re.Match[str], prefix_raw: str) -> tuple[int, int | None, bool]:
    """The (low, high, enumerate) of a group prefix; ``high=None`` means all alternatives."""
    if prefix.group("enum"):
        return 1, 1, True
    if prefix.group("exact") is not None:
        count = _count(prefix.group("exact"))
        return count, count, False
    low = _count(prefix.group("low")) if prefix.group("low") else 1
    high = _count(prefix.group("high")) if prefix.group("high") else None
    if high is not None and low > high:
        raise DynamicPromptError(
            f'the variant count range "{prefix_raw}" has its minimum above its maximum: '
            f'write "{high}-{low}$$"'
        )
    return low, high, False


def _count(digits: str) -> int:
    """A count's digits as a number; more than 9 digits (beyond any group's size) is 10**9."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_COUNT_DIGITS else 10**_MAX_COUNT_DIGITS


# --- enumeration ---------------------------------------------------------------------


def _count_sequence(nodes: tuple[_Node, ...]) -> int:
    """How many lines `_expand_sequence` makes, without making them."""
    total = 1
    for node in nodes:
        if isinstance(node, _Group):
            counts = [_count_sequence(alternative) for alternative in node.alternatives]
            if node.enumerate_all:
                total *= sum(counts)
            else:
                for count in counts:
                    total *= count
    return total


def _expand_sequence(nodes: tuple[_Node, ...]) -> list[str]:
    """All lines of a node sequence, first group varying slowest."""
    lines = [""]
    for node in nodes:
        options = [node.raw] if isinstance(node, _Text) else _expand_group(node)
        lines = [line + option for line in lines for option in options]
    return lines


def _expand_group(group: _Group) -> list[str]:
    """An ``e$$`` group's alternatives (expanded); a random group re-written per combination."""
    expanded = [_expand_sequence(alternative) for alternative in group.alternatives]
    if group.enumerate_all:
        return [line for alternative in expanded for line in alternative]
    combinations = [""]
    for index, alternative in enumerate(expanded):
        joiner = "|" if index else ""
        combinations = [done + joiner + option for done in combinations for option in alternative]
    return ["{" + group.prefix_raw + combination + "}" for combination in combinations]


# --- random picks --------------------------------------------------------------------


def _pick_sequence(nodes: tuple[_Node, ...], rng: random.Random) -> str:
    """The text of a node sequence with each group resolved, left to right."""
    return "".join(
        node.value if isinstance(node, _Text) else _pick_group(node, rng) for node in nodes
    )


def _pick_group(group: _Group, rng: random.Random) -> str:
    """Draw the count (if a range), then that many distinct alternatives, and join them."""
    total = len(group.alternatives)
    high = total if group.high is None else min(group.high, total)
    low = min(group.low, high)
    count = low if low == high else rng.randint(low, high)
    chosen = rng.sample(range(total), count)
    return group.separator.join(_pick_sequence(group.alternatives[i], rng) for i in chosen)
