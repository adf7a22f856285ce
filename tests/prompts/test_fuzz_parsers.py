"""Fuzzing the prompt-line parsers: random brackets, braces, pipes, colons, `--` options, huge
numbers and unicode never raise anything but `UserError`, and never give a non-finite weight."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.errors import UserError
from library.prompts.dynamic import expand_enumerations, pick_variants
from library.prompts.line_options import parse_prompt_line
from library.prompts.seeds import SeedSource
from library.prompts.sources import Defaults, Line, jobs_for_line
from library.text.weighting import MAX_WEIGHT, parse_prompt_attention

PIECES = st.sampled_from([
    "(", ")", "[", "]", "{", "}", "|", ":", "\\", " ", "$$", "e$$", "2$$", "1-3$$", "-", ",", ".", "BREAK",
    " AND ", " --n ", " --w ", " --h ", " --s ", " --d ", " --l ", " --am ", " --t ", " --f ", " --x ", "--",
    "1.5", "0", "-1", "8", "64", "9" * 400, "9" * 5000, "1e309", "nan", "inf", "(" * 300, "{" * 40, "}" * 40,
    "a", "cat", "é", "猫", "\u200b", "\x1b[1m", "\n", "\t", "<", ">", "<lora:", "<hypernet:a:", " --style ",
])
LINES = st.lists(PIECES | st.text(max_size=3), max_size=30).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULTS = Defaults(width=64, height=64, steps=4, scale=7.5, negative_scale=None, images_per_prompt=2)


def _finite_weights(text: str) -> None:
    for piece, weight in parse_prompt_attention(text):
        assert isinstance(piece, str)
        assert math.isfinite(weight) and abs(weight) <= MAX_WEIGHT


@SETTINGS
@given(LINES)
def test_attention_weights_are_always_finite(text: str) -> None:
    _finite_weights(text)


@SETTINGS
@given(LINES, st.integers(0, 2**32 - 1))
def test_variants_raise_only_user_errors(text: str, seed: int) -> None:
    try:
        for prompt in expand_enumerations(text)[:3]:
            _finite_weights(pick_variants(prompt, seed))
    except UserError:
        pass


@SETTINGS
@given(LINES)
def test_prompt_lines_raise_only_user_errors(text: str) -> None:
    try:
        parse_prompt_line(text)
    except UserError:
        pass


@SETTINGS
@given(LINES, st.integers(0, 2**32 - 1))
def test_jobs_for_line_raise_only_user_errors(text: str, seed: int) -> None:
    try:
        jobs = list(jobs_for_line(Line(text, "fuzz"), DEFAULTS, SeedSource(seed, False), None, lambda *texts: 1))
    except UserError:
        return
    for job in jobs:
        assert 0 <= job.seed <= 2**32 - 1 and job.steps >= 1 and math.isfinite(job.scale)
        _finite_weights(job.prompt)
        _finite_weights(job.negative_prompt)
