"""Exact outputs of the attention parser and the ` AND ` splitter, plus properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from library.text.weighting import (
    BREAK_TEXT,
    BREAK_WEIGHT,
    parse_prompt_attention,
    split_and,
)

# The examples of the web UI's own docstring, output for output.
WEB_UI_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]

# Worked out from the rules: x1.1 per (), x(1/1.1) per [], open brackets close at the end
# (round ones first, then square ones), unmatched closers are text, escapes drop the backslash.
MORE_EXAMPLES = [
    ("", [["", 1.0]]),
    ("plain, text: with colon", [["plain, text: with colon", 1.0]]),
    ("[a", [["a", 0.9090909090909091]]),  # 1 * (1/1.1)
    ("[[x]]", [["x", 0.8264462809917354]]),  # (1/1.1) * (1/1.1)
    ("((a)", [["a", 1.2100000000000002]]),  # 1.1 at ")", 1.1 more at the end
    ("(((a)))", [["a", 1.3310000000000004]]),
    ("[a](b)", [["a", 0.9090909090909091], ["b", 1.1]]),
    ("a (b [c] d) e", [["a ", 1.0], ["b ", 1.1], ["c", 1.0], [" d", 1.1], [" e", 1.0]]),
    ("a]b", [["a]b", 1.0]]),  # no "[" open: literal
    ("a)b", [["a)b", 1.0]]),
    ("[a)", [["a)", 0.9090909090909091]]),  # ")" with only "[" open is text
    ("(a][b)", [["a]", 1.1], ["b", 1.0]]),  # b: x1.1 at ")", x(1/1.1) at the end
    ("a:1.3)", [["a:1.3)", 1.0]]),  # a weight closer with no "(" open is text
    ("(a:1.3)", [["a", 1.3]]),
    ("(a: 1.5 )b", [["a", 1.5], ["b", 1.0]]),  # spaces around the number
    ("(a:+.5)", [["a", 0.5]]),
    ("(a:-1)", [["a", -1.0]]),
    ("(a:1.)", [["a", 1.0]]),
    ("((a:2):3)", [["a", 6.0]]),
    ("(a:1.2.3)", [["a:1.2.3", 1.1]]),  # not a number: text, and ")" closes with x1.1
    ("(a:x)", [["a:x", 1.1]]),
    ("(a:)", [["a:", 1.1]]),
    ("\\", [["", 1.0]]),  # a lone backslash is dropped
    ("a\\b", [["ab", 1.0]]),
    ("a\\\\b", [["a\\b", 1.0]]),
    ("\\[x\\)", [["[x)", 1.0]]),
    ("(\\)", [[")", 1.1]]),
    ("(\\", [["", 1.1]]),
    ("\\((a)\\)", [["(", 1.0], ["a", 1.1], [")", 1.0]]),
]

BREAK_EXAMPLES = [
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a   BREAK\tb", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("a BREAK BREAK b", [["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a,BREAK,b", [["a,", 1.0], ["BREAK", -1], [",b", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1], ["b", 1.1]]),  # marker not multiplied
    ("[a] BREAK (b)", [["a", 0.9090909090909091], ["", 1.0], ["BREAK", -1], ["", 1.0], ["b", 1.1]]),
    ("(x BREAK:-1)", [["x", -1.0], ["BREAK", -1], ["", -1.0]]),  # markers never merge
    ("xBREAK BREAKy", [["xBREAK BREAKy", 1.0]]),  # not a standalone word
    ("a break b", [["a break b", 1.0]]),  # case-sensitive
    ("BRE(AK)", [["BRE", 1.0], ["AK", 1.1]]),
]


@pytest.mark.parametrize("text, expected", WEB_UI_EXAMPLES + MORE_EXAMPLES + BREAK_EXAMPLES)
def test_parse_prompt_attention_exact(text: str, expected: list[list[str | float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_break_marker_is_the_int_minus_one() -> None:
    marker = parse_prompt_attention("a BREAK b")[1]
    assert marker == [BREAK_TEXT, BREAK_WEIGHT] == ["BREAK", -1]
    assert type(marker[1]) is int


def test_results_are_fresh_lists() -> None:
    first = parse_prompt_attention("")
    first[0][0] = "changed"
    assert parse_prompt_attention("") == [["", 1.0]]


@pytest.mark.parametrize(
    "prompt, parts",
    [
        ("a AND b", ["a", "b"]),
        ("a AND b AND c", ["a", "b", "c"]),
        ("a AND  b ", ["a", " b "]),
        ("no and here", ["no and here"]),
        ("ANDROID AND", ["ANDROID AND"]),
        ("aAND b", ["aAND b"]),
        ("a AND AND b", ["a", "AND b"]),
        ("(a AND b)", ["(a", "b)"]),
        ("", [""]),
    ],
)
def test_split_and(prompt: str, parts: list[str]) -> None:
    assert split_and(prompt) == parts


# --- properties --------------------------------------------------------------------------

_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _weight_closer_end(text: str, colon: int) -> int | None:
    """End of ``:<spaces><number><spaces>)`` starting at `colon`, or None (scanned by hand)."""
    i = colon + 1
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] in "+-":
        i += 1
    digits_before = 0
    while i < len(text) and text[i].isdecimal():
        i, digits_before = i + 1, digits_before + 1
    digits_after = 0
    if i < len(text) and text[i] == ".":
        i += 1
        while i < len(text) and text[i].isdecimal():
            i, digits_after = i + 1, digits_after + 1
    if digits_before == 0 and digits_after == 0:
        return None
    while i < len(text) and text[i].isspace():
        i += 1
    return i + 1 if i < len(text) and text[i] == ")" else None


def _reference_text(text: str) -> str:
    """The text the parser must keep, by a character scan independent of the parser.

    Syntax (removed): an unescaped "(" or "["; a ")" or "]" that closes an open bracket of
    its kind; ":<number>)" while a "(" is open; every backslash (one of the pair "\\\\"
    survives, and the character after it when it is one of ()[]\\); and BREAK words with
    their surrounding whitespace inside a run of plain characters. Everything else is kept.
    """
    out: list[str] = []
    run: list[str] = []
    open_round = open_square = 0
    i = 0

    def flush() -> None:
        out.append(_BREAK.sub("", "".join(run)))
        run.clear()

    while i < len(text):
        char = text[i]
        if char not in "\\()[]:":
            run.append(char)
            i += 1
            continue
        flush()
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following and following in "()[]\\":
                out.append(following)
                i += 2
            else:
                i += 1
        elif char == "(":
            open_round += 1
            i += 1
        elif char == "[":
            open_square += 1
            i += 1
        elif char == ")":
            if open_round:
                open_round -= 1
            else:
                out.append(")")
            i += 1
        elif char == "]":
            if open_square:
                open_square -= 1
            else:
                out.append("]")
            i += 1
        else:  # ":"
            end = _weight_closer_end(text, i) if open_round else None
            if end is None:
                out.append(":")
                i += 1
            else:
                open_round -= 1
                i = end
    flush()
    return "".join(out)


def _kept_text(entries: list[list[str | float]]) -> str:
    return "".join(str(text) for text, weight in entries if [text, weight] != ["BREAK", -1])


SYNTAX_HEAVY = st.lists(
    st.sampled_from(
        ["a", "b", " ", "\t", "(", ")", "[", "]", ":", "1.5", ":2)", ": 0.5 )", ":1.2.3)", "\\",
         "\\(", "\\]", "\\\\", "BREAK", " BREAK ", "x", "-", ".", ",", "+", "AND"]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_and_is_well_formed(text: str) -> None:
    entries = parse_prompt_attention(text)
    assert entries
    for entry in entries:
        assert isinstance(entry, list) and len(entry) == 2
        assert isinstance(entry[0], str) and isinstance(entry[1], (int, float))
    for left, right in zip(entries, entries[1:]):
        is_marker = [left, right].count(["BREAK", -1]) > 0
        assert is_marker or left[1] != right[1]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), SYNTAX_HEAVY))
def test_kept_text_is_the_input_without_syntax(text: str) -> None:
    assert _kept_text(parse_prompt_attention(text)) == _reference_text(text)


PLAIN = st.text(alphabet=st.characters(blacklist_characters="\\()[]:"), min_size=1).filter(
    lambda text: not _BREAK.search(text)
)


@settings(max_examples=300, deadline=None)
@given(PLAIN)
def test_plain_text_is_one_entry(text: str) -> None:
    assert parse_prompt_attention(text) == [[text, 1.0]]
    assert parse_prompt_attention(f"({text})") == [[text, 1.1]]
    assert parse_prompt_attention(f"[{text}]") == [[text, 1 / 1.1]]


@settings(max_examples=300, deadline=None)
@given(PLAIN, st.floats(min_value=0, max_value=10, allow_nan=False))
def test_explicit_weight(text: str, weight: float) -> None:
    written = f"{weight:.3f}"
    result = parse_prompt_attention(f"({text}:{written})")
    assert result == [[text, float(written)]]
