"""Exact outputs of the dynamic prompt variants: enumeration, seeded picks, errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from library.errors import UserError
from library.prompts.dynamic import (
    DEFAULT_SEPARATOR,
    MAX_ENUMERATED_PROMPTS,
    DynamicPromptError,
    expand_enumerations,
    has_dynamic_syntax,
    pick_variants,
)

SEEDS = range(200)


# --- enumeration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("no groups here", ["no groups here"]),
        ("", [""]),
        ("a {e$$x|y|z} b", ["a x b", "a y b", "a z b"]),
        ("{e$$x|y} {e$$1|2|3}", ["x 1", "x 2", "x 3", "y 1", "y 2", "y 3"]),
        ("{e$$a|{e$$b|c}}", ["a", "b", "c"]),
        ("{e$$a|{b|c}}", ["a", "{b|c}"]),
        ("{a|{e$$b|c}}", ["{a|b}", "{a|c}"]),
        ("{2$$ and $$a|{e$$b|c}|{e$$d|e}}", [
            "{2$$ and $$a|b|d}", "{2$$ and $$a|b|e}", "{2$$ and $$a|c|d}", "{2$$ and $$a|c|e}",
        ]),
        ("{e$$}", [""]),
        ("{e$$a|}", ["a", ""]),
        ("keep \\{x\\|y\\} {1-2$$p|q} \\\\(z) {e$$1|2}", [
            "keep \\{x\\|y\\} {1-2$$p|q} \\\\(z) 1", "keep \\{x\\|y\\} {1-2$$p|q} \\\\(z) 2",
        ]),
        ("{e$$a\\|b|c}", ["a\\|b", "c"]),
    ],
)
def test_expand_enumerations(line: str, expected: list[str]) -> None:
    assert expand_enumerations(line) == expected


# What the original's own dynamic-prompt code gives for each line (its regular expression
# `{((e|E)$$)?(([\d-]+)$$)?(([^|}]+?)$$)?...}`, the count range swapped when reversed, the
# combinations of an enumerated group from itertools.combinations).
@pytest.mark.parametrize(
    "line, expected",
    [
        ("{E$$a|b}", ["a", "b"]),
        ("x {E$$a|b} {e$$c|d}", ["x a c", "x a d", "x b c", "x b d"]),
        ("{e$$2$$a|b|c}", ["a, b", "a, c", "b, c"]),
        ("{e$$1-2$$a|b|c}", ["a", "b", "c", "a, b", "a, c", "b, c"]),
        ("{e$$2$$ and $$a|b|c}", ["a and b", "a and c", "b and c"]),
        ("{E$$3$$a|b|c}", ["a, b, c"]),
        ("{e$$0-1$$a|b}", ["", "a", "b"]),
    ],
)
def test_enumerations_as_the_original(line: str, expected: list[str]) -> None:
    assert expand_enumerations(line) == expected


def test_reversed_count_range_is_the_range_as_the_original() -> None:
    for seed in SEEDS:
        assert pick_variants("{3-1$$a|b|c|d}", seed) == pick_variants("{1-3$$a|b|c|d}", seed)
    assert {len(pick_variants("{3-1$$a|b|c|d}", seed).split(", ")) for seed in SEEDS} == {1, 2, 3}


def test_separator_without_a_count_as_the_original() -> None:
    assert {pick_variants("{ and $$a|b}", seed) for seed in SEEDS} == {"a", "b"}


def test_a_wide_random_group_is_linear() -> None:
    import time

    group = "{" + "|".join(f"w{n}" for n in range(200_000)) + "}"
    start = time.perf_counter()
    assert expand_enumerations("x " + group) == ["x " + group]
    assert pick_variants("x " + group, 5) == "x " + pick_variants(group, 5)
    assert time.perf_counter() - start < 20  # 29 s when the group was re-joined alternative by alternative


def test_expand_enumerations_limit() -> None:
    hundred = "{e$$" + "|".join(str(n) for n in range(100)) + "}"
    assert len(expand_enumerations(hundred + " " + hundred)) == 10_000  # at the limit: fine
    group = "{e$$" + "|".join(str(n) for n in range(101)) + "}"
    with pytest.raises(DynamicPromptError) as caught:
        expand_enumerations(group + " " + group)
    assert str(caught.value) == (
        "the {e$$...} groups of the prompt make more than 10000 prompts: "
        "use fewer alternatives or {a|b} random groups"
    )
    assert MAX_ENUMERATED_PROMPTS == 10_000


# --- seeded picks ------------------------------------------------------------------------


def test_single_pick_is_random_random_of_the_seed() -> None:
    options = ["red", "green", "blue"]
    for seed in SEEDS:
        index = random.Random(seed).sample(range(3), 1)[0]
        assert pick_variants("a {red|green|blue} car", seed) == f"a {options[index]} car"
    assert [pick_variants("{red|green|blue}", seed) for seed in range(5)] == [
        "green", "red", "red", "red", "red"
    ]
    assert {pick_variants("{red|green|blue}", seed) for seed in SEEDS} == set(options)


def test_same_seed_same_prompt() -> None:
    line = "{a|b|c} {2$$d|e|f|g} {1-3$$ + $$h|i|j|k} {x|{y|z}}"
    for seed in (0, 1, 12345, 2**40 + 3):
        assert pick_variants(line, seed) == pick_variants(line, seed)


def test_groups_draw_left_to_right_from_one_generator() -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        first = "ab"[rng.sample(range(2), 1)[0]]
        second = "cd"[rng.sample(range(2), 1)[0]]
        assert pick_variants("{a|b}{c|d}", seed) == first + second


def test_counted_pick_distinct_joined_with_comma() -> None:
    assert DEFAULT_SEPARATOR == ", "
    seen = set()
    for seed in SEEDS:
        parts = pick_variants("{2$$a|b|c}", seed).split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2 and set(parts) <= {"a", "b", "c"}
        expected = [["a", "b", "c"][i] for i in random.Random(seed).sample(range(3), 2)]
        assert parts == expected
        seen.add(tuple(parts))
    assert len(seen) == 6  # every ordered pair: the order is the draw order


def test_custom_separator_keeps_its_spaces() -> None:
    assert {pick_variants("{2$$ and $$a|b}", seed) for seed in SEEDS} == {"a and b", "b and a"}
    assert {pick_variants("{2$$-$$a|b}", seed) for seed in SEEDS} == {"a-b", "b-a"}
    assert {pick_variants("{2$$ $ $$a|b}", seed) for seed in SEEDS} == {"a $ b", "b $ a"}
    assert {pick_variants("{2$$$$a|b}", seed) for seed in SEEDS} == {"ab", "ba"}


@pytest.mark.parametrize(
    "prefix, counts",
    [
        ("1-3$$", {1, 2, 3}),
        ("-3$$", {1, 2, 3}),
        ("2-$$", {2, 3, 4}),
        ("-$$", {1, 2, 3, 4}),
        ("2-2$$", {2}),
        ("3-9$$", {3, 4}),  # the maximum is lowered to the 4 alternatives
        ("0$$", {0}),
        ("0-1$$", {0, 1}),
        ("9$$", {4}),
    ],
)
def test_count_ranges(prefix: str, counts: set[int]) -> None:
    seen = set()
    for seed in SEEDS:
        text = pick_variants("{" + prefix + "a|b|c|d}", seed)
        parts = text.split(", ") if text else []
        assert len(set(parts)) == len(parts)
        seen.add(len(parts))
    assert seen == counts


def test_range_pick_draws_the_count_first() -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        count = rng.randint(1, 3)
        expected = ", ".join("abc"[i] for i in rng.sample(range(3), count))
        assert pick_variants("{1-3$$a|b|c}", seed) == expected


def test_nesting_resolves_only_the_chosen_branch() -> None:
    assert {pick_variants("{a|{b|c}}", seed) for seed in SEEDS} == {"a", "b", "c"}
    assert {pick_variants("{{x|y}{1|2}}", seed) for seed in SEEDS} == {"x1", "x2", "y1", "y2"}
    for seed in SEEDS:
        rng = random.Random(seed)
        if rng.sample(range(2), 1)[0] == 0:
            expected = "a"
        else:
            expected = "bc"[rng.sample(range(2), 1)[0]]
        assert pick_variants("{a|{b|c}}", seed) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        ("x \\{a\\|b\\} y", "x {a|b} y"),
        ("{a\\|b}", "a|b"),
        ("{\\{\\}}", "{}"),
        ("a|b", "a|b"),  # "|" outside a group is text
        ("{}", ""),
        ("{only}", "only"),
        ("{a$$b}", "b"),  # "a$$" is a separator, as the original reads it  # not a prefix: text
        ("{e$$solo}", "solo"),
        ("\\(kept\\) \\x", "\\(kept\\) \\x"),  # other backslashes are the attention parser's
        ("\\\\{p}", "\\\\p"),  # "\\\\" is a pair and does not escape the brace
        ("end\\", "end\\"),
        ("(a:1.2), [b] --n c", "(a:1.2), [b] --n c"),
    ],
)
def test_literal_and_escapes(line: str, expected: str) -> None:
    assert pick_variants(line, 7) == expected


def test_enumeration_group_is_picked_at_random_when_not_expanded() -> None:
    assert {pick_variants("{e$$a|b}", seed) for seed in SEEDS} == {"a", "b"}


def test_expanded_lines_then_picks() -> None:
    lines = expand_enumerations("{e$$cat|dog} on a {red|blue} mat")
    assert lines == ["cat on a {red|blue} mat", "dog on a {red|blue} mat"]
    assert [pick_variants(line, 3) for line in lines] == ["cat on a red mat", "dog on a red mat"]


def test_has_dynamic_syntax() -> None:
    assert has_dynamic_syntax("a {b|c}")
    assert has_dynamic_syntax("{e$$a}")
    assert not has_dynamic_syntax("a \\{b\\|c\\}")
    assert not has_dynamic_syntax("a | b")


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("a {b|c", 'unclosed "{" at column 3 of the prompt: close it with "}" or write "\\{" for a literal brace'),
        ("{a|{b|c}", 'unclosed "{" at column 1 of the prompt: close it with "}" or write "\\{" for a literal brace'),
        ("a {b {c|d}", 'unclosed "{" at column 3 of the prompt: close it with "}" or write "\\{" for a literal brace'),
        ("a}", 'unmatched "}" at column 2 of the prompt: remove it or write "\\}" for a literal brace'),
        ("{a}}", 'unmatched "}" at column 4 of the prompt: remove it or write "\\}" for a literal brace'),
    ],
)
def test_errors(line: str, message: str) -> None:
    for call in (lambda: pick_variants(line, 0), lambda: expand_enumerations(line)):
        with pytest.raises(DynamicPromptError) as caught:
            call()
        assert str(caught.value) == message
        assert isinstance(caught.value, UserError)


# --- properties --------------------------------------------------------------------------

NO_SYNTAX = st.text(alphabet=st.characters(blacklist_characters="{}\\"))


@settings(max_examples=300, deadline=None)
@given(NO_SYNTAX, st.integers(min_value=0, max_value=2**64))
def test_text_without_groups_is_unchanged(line: str, seed: int) -> None:
    assert pick_variants(line, seed) == line
    assert expand_enumerations(line) == [line]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(), st.lists(st.sampled_from(["{", "}", "|", "\\", "e$$", "2$$", "-", "a", " "])).map("".join)),
    st.integers(min_value=0, max_value=1000),
)
def test_arbitrary_text_gives_text_or_a_user_error(line: str, seed: int) -> None:
    try:
        assert isinstance(pick_variants(line, seed), str)
        assert all(isinstance(expanded, str) for expanded in expand_enumerations(line))
    except DynamicPromptError:
        pass


WORD = st.text(alphabet="abcxyz ", max_size=4)


@st.composite
def templates(draw: st.DrawFn, depth: int = 2) -> tuple[str, int, set[str]]:
    """A valid template, its number of enumerated lines, and every text a pick can give."""
    line, count, outcomes = "", 1, {""}
    for _ in range(draw(st.integers(0, 3))):
        if depth == 0 or draw(st.booleans()):
            word = draw(WORD)
            line, outcomes = line + word, {done + word for done in outcomes}
            continue
        alternatives = [draw(templates(depth=depth - 1)) for _ in range(draw(st.integers(1, 3)))]
        enumerate_all = draw(st.booleans())
        line += "{" + ("e$$" if enumerate_all else "") + "|".join(a[0] for a in alternatives) + "}"
        counts = [a[1] for a in alternatives]
        if enumerate_all:
            count *= sum(counts)
        else:
            for one in counts:
                count *= one
        choices = set().union(*(a[2] for a in alternatives))
        outcomes = {done + choice for done in outcomes for choice in choices}
    return line, count, outcomes


@settings(max_examples=300, deadline=None)
@given(templates(), st.integers(min_value=0, max_value=2**32))
def test_valid_templates(template: tuple[str, int, set[str]], seed: int) -> None:
    line, count, outcomes = template
    expanded = expand_enumerations(line)
    assert len(expanded) == count
    assert pick_variants(line, seed) in outcomes
    for one in expanded:
        assert pick_variants(one, seed) in outcomes
        assert "e$$" not in one
