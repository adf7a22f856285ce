"""The prompt-editing / alternation parser: the text at each step, exact errors, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.errors import UserError
from library.sampling.prompt_schedule import call_steps
from library.text.prompt_editing import distinct_texts, has_editing, schedule, text_at


@pytest.mark.parametrize(("prompt", "texts"), [
    ("[a:b:3]", ["a", "a", "a", "b", "b", "b"]),
    ("[a:b:0.5]", ["a", "a", "a", "b", "b", "b"]),
    ("[a:b:0]", ["b"] * 6),
    ("[a:b:100]", ["a"] * 6),
    ("x [to:2] y", ["x  y", "x  y", "x to y", "x to y", "x to y", "x to y"]),
    ("[from::4]", ["from"] * 4 + [""] * 2),
    ("[a|b]", ["a", "b", "a", "b", "a", "b"]),
    ("[a|b|]", ["a", "b", "", "a", "b", ""]),
    ("[[a|b]:c:4]", ["a", "b", "a", "b", "c", "c"]),
    ("([a:b:2]:1.2), [c]", ["(a:1.2), [c]"] * 2 + ["(b:1.2), [c]"] * 4),
    ("[(a:1.1):c: 2 ]", ["(a:1.1)"] * 2 + ["c"] * 4),
    ("[a BREAK b:c:1]", ["a BREAK b"] + ["c"] * 5),
])
def test_text_per_step(prompt, texts):
    assert list(schedule(prompt, 6)) == texts
    assert [text_at(prompt, s, 6) for s in range(1, 7)] == texts
    assert has_editing(prompt)


@pytest.mark.parametrize("prompt", ["plain (a:1.2) [weak] text", "a [b", "a ] b", r"\[a:b:2\]", "(a:b",
                                    "[(a:b]", "a [cat] (dog:0.5) BREAK x"])
def test_prompts_without_editing_are_unchanged(prompt):
    assert not has_editing(prompt)
    assert set(schedule(prompt, 5)) == {prompt}


@pytest.mark.parametrize(("prompt", "message"), [
    ("[a:b:x]", "[a:b:x]: 'x' is not a number (prompt editing is [from:to:when], when a step or a fraction of "
                "the steps)"),
    ("[a:b:]", "[a:b:]: '' is not a number (prompt editing is [from:to:when], when a step or a fraction of the "
               "steps)"),
    ("[a:b:-1]", "[a:b:-1]: when -1 is below 0 (a step, or a fraction of the steps below 1)"),
    ("[a:b:c:2]", "[a:b:c:2]: too many ':' (prompt editing is [from:to:when])"),
    ("[a:b|c]", "[a:b|c]: ':' and '|' mixed in one bracket (prompt editing is [from:to:when], alternation [a|b])"),
    ("x [a:b:2", "'[' at character 3 of the prompt is never closed (prompt editing is [from:to:when], "
                 "alternation [a|b])"),
])
def test_mistakes(prompt, message):
    with pytest.raises(UserError) as info:
        schedule(prompt, 6)
    assert str(info.value) == message


def test_distinct_texts_and_call_steps():
    assert distinct_texts(["[a|b] x", "[c:d:1]"], 4) == ("a x", "b x", "c", "d")
    assert call_steps(6, 6, 6) == [(s, 6) for s in range(1, 7)]
    assert call_steps(3, 6, 6) == [(1, 3), (2, 3), (3, 3)]  # img2img's tail: its own schedule
    assert [s for s, _ in call_steps(11, 11, 6)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]  # two calls a step


PIECES = st.sampled_from(["[", "]", "(", ")", ":", "|", "\\", " ", "a", "b", "1", "0.5", "-1", "1e400", "x",
                          "BREAK", "é", "[" * 150, ")" * 20, "9" * 400, "nan", "inf"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PIECES | st.text(max_size=3), max_size=30).map("".join), st.integers(1, 30))
def test_fuzz_only_user_errors_and_plain_prompts_unchanged(prompt, steps):
    try:
        texts = schedule(prompt, steps)
        edited = has_editing(prompt)
    except UserError:
        return
    assert len(texts) == steps and all(isinstance(t, str) for t in texts)
    if not edited:
        assert set(texts) == {prompt}


def test_and_parts_and_negatives_are_resolved_per_step_and_chunks_cover_every_step():
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Defaults, Line, jobs_for_line
    from library.sampling.prompt_schedule import jobs_at

    long = " ".join(["word"] * 100)
    chunks = lambda *texts: max(len(t.split()) // 75 + 1 for t in texts)  # noqa: E731
    (job,) = jobs_for_line(Line(f"[a:{long}:2] AND c [d|e] --n [x::1] --d 1", "p.txt:1"),
                           Defaults(64, 64, 4, 7.5, None, 1), SeedSource(1, False), None, chunks)
    assert job.chunks == 2  # step 3's text is 101 words
    assert job.prompt_parts == (f"[a:{long}:2]", "c [d|e]")
    (at2,) = jobs_at((job,), 2, 4, 2)
    assert (at2.prompt_parts, at2.negative_prompt, at2.chunks) == (("a", "c e"), "", 2)
    (at3,) = jobs_at((job,), 3, 4, 2)
    assert at3.prompt_parts == (long, "c d")
