"""Dynamic prompt variants: ``{a|b|c}`` groups that make one prompt line into many.

The syntax is the one the original `gen_img.py` took over from the "Dynamic Prompts"
web UI extension:

- ``{a|b|c}`` picks one alternative per image.
- ``{e$$a|b|c}`` (or ``{E$$...}``) enumerates: one prompt per alternative; several
  ``{e$$...}`` groups give the cartesian product, the first group varying slowest.
  With a count, ``{e$$2$$a|b|c}`` enumerates the combinations of 2 (``a, b``, ``a, c``,
  ``b, c``) and ``{e$$1-2$$...}`` those of 1, then of 2, in the order of
  `itertools.combinations`, joined with the separator.
- ``{2$$a|b|c}`` picks 2 distinct alternatives, in the random order they were drawn,
  joined with ``", "`` (the extension's default separator).
- ``{2$$ and $$a|b|c}`` joins with a custom separator, here `` and `` (spaces kept).
  The separator is plain text: no ``{ } | \\`` and no ``$$`` inside.
- ``{1-3$$a|b|c}`` picks a random count in 1..3 first; ``{3-1$$...}`` is read as
  ``{1-3$$...}`` (as the original); ``{-3$$...}`` means 1..3 and ``{2-$$...}`` means
  2..(number of alternatives). A count above the number of alternatives is lowered to
  it; ``0$$`` gives the empty string. A count of three or more parts (``1-2-3$$``) is
  read as 1, with a warning, as the original.
- ``{ and $$a|b}`` (a separator without a count) is a separator too, as the original
  reads it (it matters only where more than one alternative is picked).
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

import functools
import itertools
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
_SPECIAL = re.compile(r"[\\{}|]")
# Group prefix: "e$$", or a count "2$$" / "1-3$$" / "-3$$" / "2-$$" / "-$$" with an optional
# separator "sep$$" after it.
_PREFIX = re.compile(
    r"(?:(?P<enum>[eE])\$\$)?(?:(?P<count>[\d-]+)\$\$)?"
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

    raw: str  # the whole group as written
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
            f"the {{e$$...}} groups of the prompt make more than {MAX_ENUMERATED_PROMPTS} prompts: "
            "use fewer alternatives or {a|b} random groups"
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


@functools.lru_cache(maxsize=8)
def _parse(line: str) -> tuple[_Node, ...]:
    """Parse a whole line into text and group nodes (cached: a line is picked once per image)."""
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
        else:  # plain text up to the next character that may mean something
            special = _SPECIAL.search(line, position + 1)
            end = special.start() if special else len(line)
            raw.append(line[position:end])
            value.append(line[position:end])
            position = end
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
    if prefix and prefix.group(0) not in ("", "$$"):
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
    group = _Group(line[start:position], prefix_raw, enumerate_all, low, high, separator, tuple(alternatives))
    return group, position


def _count_range(prefix: re.Match[str], prefix_raw: str) -> tuple[int, int | None, bool]:
    """The (low, high, enumerate) of a group prefix; ``high=None`` means all alternatives."""
    enumerate_all = prefix.group("enum") is not None
    if prefix.group("count") is None:
        return 1, 1, enumerate_all
    parts = prefix.group("count").split("-")
    if len(parts) == 1:
        count = _count(parts[0])
        return count, count, enumerate_all
    if len(parts) > 2:
        logger.warning('the variant count "%s" has more than two parts; read as 1 (write "1-3$$" for a range)',
                       prefix.group("count"))
        return 1, 1, enumerate_all
    low = _count(parts[0]) if parts[0] else 1
    high = _count(parts[1]) if parts[1] else None
    if high is not None and low > high:  # "3-1$$" is "1-3$$", as the original reads it
        low, high = high, low
    return low, high, enumerate_all


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
                total *= _combination_count(counts, *_sizes(node))
            else:
                for count in counts:
                    total = min(total * count, MAX_ENUMERATED_PROMPTS + 1)
        total = min(total, MAX_ENUMERATED_PROMPTS + 1)
    return total


def _sizes(group: _Group) -> tuple[int, int]:
    """The smallest and largest number of alternatives a group takes (within how many it has)."""
    high = len(group.alternatives) if group.high is None else min(group.high, len(group.alternatives))
    return min(group.low, high), high


def _combination_count(counts: list[int], low: int, high: int) -> int:
    """Lines of an enumerated group: over every k in low..high and every k alternatives, the
    product of their line counts; above `MAX_ENUMERATED_PROMPTS` it stops counting."""
    cap = MAX_ENUMERATED_PROMPTS + 1
    if all(count == 1 for count in counts):
        total = 0
        for k in range(low, high + 1):
            total += _capped_comb(len(counts), k, cap)
            if total >= cap:
                return cap
        return total
    if len(counts) * (high + 1) > 10**6:  # nested enumerations in a very wide group: surely too many
        return cap
    sums = [1] + [0] * high  # sums[k]: lines from k of the alternatives seen so far
    for count in counts:
        for k in range(high, 0, -1):
            sums[k] = min(sums[k] + sums[k - 1] * count, cap)
    return min(sum(sums[low : high + 1]), cap)


def _capped_comb(n: int, k: int, cap: int) -> int:
    """``math.comb(n, k)``, or `cap` once it reaches it (without computing a huge number)."""
    k = min(k, n - k)
    if k < 0:
        return 0
    value = 1
    for i in range(k):
        value = value * (n - i) // (i + 1)
        if value >= cap:
            return cap
    return value


def _expand_sequence(nodes: tuple[_Node, ...]) -> list[str]:
    """All lines of a node sequence, first group varying slowest."""
    lines = [""]
    for node in nodes:
        options = [node.raw] if isinstance(node, _Text) else _expand_group(node)
        lines = [line + option for line in lines for option in options]
    return lines


def _expand_group(group: _Group) -> list[str]:
    """An ``e$$`` group's combinations (expanded); a random group re-written per combination."""
    expanded = [_expand_sequence(alternative) for alternative in group.alternatives]
    if group.enumerate_all:
        low, high = _sizes(group)
        return [
            group.separator.join(chosen)
            for k in range(low, high + 1)
            for indexes in itertools.combinations(range(len(expanded)), k)
            for chosen in itertools.product(*(expanded[i] for i in indexes))
        ]
    if not any(_enumerates(alternative) for alternative in group.alternatives):  # as written
        return [group.raw]
    combinations = [""]
    for index, alternative in enumerate(expanded):
        joiner = "|" if index else ""
        combinations = [done + joiner + option for done in combinations for option in alternative]
    return ["{" + group.prefix_raw + combination + "}" for combination in combinations]


def _enumerates(nodes: tuple[_Node, ...]) -> bool:
    """True when an ``e$$`` group is somewhere in `nodes`."""
    return any(isinstance(node, _Group) and (node.enumerate_all or any(map(_enumerates, node.alternatives)))
               for node in nodes)


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
