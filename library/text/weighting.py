"""The model-free part of prompt weighting: the AUTOMATIC1111 attention syntax and ` AND `.

`parse_prompt_attention` turns a prompt into ``[text, weight]`` pairs with the same
semantics and the same output as the web UI's parser, so that prompts users wrote for
it (and for the original `gen_img.py`, which follows it) weigh the same here:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` multiplies it by
  ``1 / 1.1``, ``(text:1.3)`` multiplies it by 1.3; nesting multiplies.
- A bracket left open applies its factor to everything after it (``(unbalanced`` is
  ``unbalanced`` x1.1); a ``)`` or ``]`` with no open bracket of its kind is literal
  text, and so is ``:1.3)`` with no ``(`` open.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters (the backslash is
  removed); a backslash before any other character is dropped.
- ``BREAK`` as a standalone word (and the whitespace around it) becomes the marker
  entry ``["BREAK", -1]``, which the text encoder turns into a chunk boundary.
- Neighbours of equal weight are merged; an empty prompt gives ``[["", 1.0]]``.

The web UI is a fact source, not a code source: this is written from its documented
behaviour. Where its behaviour is a crash or an accident we differ, on purpose:

- A weight that is not a number (``(a:1.2.3)``) is not a weight token: the ``:`` and
  the digits are text and the ``)`` closes the bracket with x1.1. (The web UI raises
  ``ValueError``.)
- Weights are clamped to -`MAX_WEIGHT`..`MAX_WEIGHT` at every multiplication, so no
  weight is ever infinite or NaN: ``(a:99...9)`` with 400 digits, or thousands of nested
  brackets, would otherwise give ``inf`` (and ``inf * 0`` NaN), which turns the whole
  text encoding into NaN and the image black. (The web UI does not clamp; any weight
  past a few units already gives noise.)
- A BREAK marker keeps its weight -1 inside brackets and is never merged with a
  neighbour. (The web UI multiplies it, e.g. to -1.1, after which its encoder no
  longer recognises it and encodes the word "BREAK" with a negative weight.)

Written by hand: no maintained library parses this syntax without also pulling in a
model or a UI.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

#: Factor of one pair of round brackets.
ROUND_BRACKET_MULTIPLIER = 1.1
#: Factor of one pair of square brackets (multiplied by, not divided: float-exact as the web UI).
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
#: Largest weight magnitude; weights beyond it are clamped (see the module docstring).
MAX_WEIGHT = 100.0
#: Text of the chunk-boundary marker entry.
BREAK_TEXT = "BREAK"
#: Weight of the chunk-boundary marker entry.
BREAK_WEIGHT = -1

# One token per match, alternatives tried in order: the five escapes, a lone backslash,
# the two openers, a weight closer ":1.3)", the two closers, a run of plain text, ":".
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | [(\[]
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_AND = " AND "


def parse_prompt_attention(text: str) -> list[list[str | float]]:
    """Split `text` into ``[text, weight]`` entries following the web UI's attention syntax.

    Returns a new list of two-item lists; a BREAK marker is ``["BREAK", -1]``. Never
    raises on any string. See the module docstring for the rules.
    """
    entries: list[list[str | float]] = []
    is_marker: list[bool] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def add(piece: str, marker: bool = False) -> None:
        entries.append([piece, BREAK_WEIGHT if marker else 1.0])
        is_marker.append(marker)

    def multiply_from(start: int, factor: float) -> None:
        factor = _clamped(factor)
        for index in range(start, len(entries)):
            if not is_marker[index]:
                entries[index][1] = _clamped(entries[index][1] * factor)

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            add(token[1:])
        elif token == "(":
            round_starts.append(len(entries))
        elif token == "[":
            square_starts.append(len(entries))
        elif weight is not None and round_starts:
            multiply_from(round_starts.pop(), float(weight))
        elif token == ")" and round_starts:
            multiply_from(round_starts.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_starts:
            multiply_from(square_starts.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    add(BREAK_TEXT, marker=True)
                add(part)

    for start in round_starts:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_starts:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not entries:
        return [["", 1.0]]
    return _merge_equal_neighbours(entries, is_marker)


def _clamped(weight: float) -> float:
    """`weight` within -MAX_WEIGHT..MAX_WEIGHT (a finite weight, from finite or infinite input)."""
    return max(-MAX_WEIGHT, min(MAX_WEIGHT, weight))


def _merge_equal_neighbours(
    entries: list[list[str | float]], is_marker: list[bool]
) -> list[list[str | float]]:
    """Join runs of neighbouring text entries whose weights are equal (markers stay apart)."""
    merged: list[list[str | float]] = [entries[0]]
    merged_marker = [is_marker[0]]
    for entry, marker in zip(entries[1:], is_marker[1:]):
        if not marker and not merged_marker[-1] and merged[-1][1] == entry[1]:
            merged[-1][0] = str(merged[-1][0]) + str(entry[0])
        else:
            merged.append(entry)
            merged_marker.append(marker)
    return merged


def split_and(prompt: str) -> list[str]:
    """Split a prompt into the parts of an attention couple, at each literal `` AND ``.

    The split is exact (no stripping) and case-sensitive, so ``and`` in prose and
    ``AND`` without a space on both sides stay text. It works on the raw text, before
    attention parsing: brackets do not protect an `` AND ``. A prompt without one is a
    single part.
    """
    return prompt.split(_AND)
