"""Exact outputs and exact error texts of the prompt-line option parser."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from library.errors import UserError
from library.prompts.line_options import (
    PROMPT_OPTIONS,
    OptionKind,
    PromptLine,
    PromptOptionError,
    PromptOverrides,
    format_prompt_line,
    parse_prompt_line,
    prompt_options_help,
    unknown_option_message,
)
from library.records.limits import MAX_DIGITS

KNOWN = (
    "--n, --w, --h, --s, --d, --l, --t, --nl, --am, --c, --f, --glt, --glr, --gls, --gle, --glsn, --glus, "
    "--dsd1, --dst1, --dsd2, --dst2, --dsr, --oh, --ow, --nh, --nw, --ct, --cl, --vs, --vss, --srw, --srh, --sa, "
    "--hfs, --style"
)


@pytest.mark.parametrize(
    "options, field, value",
    [
        ("--n lowres, bad hands", "negative_prompt", "lowres, bad hands"),
        ("--w 960", "width", 960),
        ("--h 640", "height", 640),
        ("--s 28", "steps", 28),
        ("--d 1", "seeds", (1,)),
        ("--d 1,2,3,4", "seeds", (1, 2, 3, 4)),
        ("--l 12.5", "scale", 12.5),
        ("--l 7", "scale", 7.0),
        ("--t 0.75", "strength", 0.75),
        ("--nl 2.5", "negative_scale", 2.5),
        ("--am 0.8,0.5,0.3", "network_multipliers", (0.8, 0.5, 0.3)),
        ("--am -1", "network_multipliers", (-1.0,)),
        ("--c a red car", "clip_prompt", "a red car"),
        ("--f my image.png", "file_name", "my image.png"),
        ("--glt 650", "gradual_latent_timesteps", 650),
        ("--glr 0.5", "gradual_latent_ratio", 0.5),
        ("--gls 0.125", "gradual_latent_ratio_step", 0.125),
        ("--gle 3", "gradual_latent_every_n_steps", 3),
        ("--dsd1 3", "ds_depth_1", 3),
        ("--dst1 650", "ds_timesteps_1", 650),
        ("--dsd2 1", "ds_depth_2", 1),
        ("--dst2 900", "ds_timesteps_2", 900),
        ("--dsr 0.25", "ds_ratio", 0.25),
        ("--l .5", "scale", 0.5),
        ("--l 5.", "scale", 5.0),
        ("--am 0.5,-0.25", "network_multipliers", (0.5, -0.25)),
    ],
)
def test_each_option(options: str, field: str, value: object) -> None:
    parsed = parse_prompt_line("a cat " + options)
    assert parsed == PromptLine("a cat", PromptOverrides(**{field: value}))
    assert type(getattr(parsed.overrides, field)) is type(value)


def test_manual_example() -> None:
    line = (
        "(masterpiece, best quality), 1girl, [from below], [goodembed] --n realistic, "
        "(negprompt), (lowres:1.1), blurry --w 960 --h 640 --s 28 --d 1"
    )
    assert parse_prompt_line(line) == PromptLine(
        "(masterpiece, best quality), 1girl, [from below], [goodembed]",
        PromptOverrides(
            negative_prompt="realistic, (negprompt), (lowres:1.1), blurry",
            width=960, height=640, steps=28, seeds=(1,),
        ),
    )


def test_every_option_at_once() -> None:
    line = (
        "p --n q --w 8 --h 16 --s 1 --d 0,5 --l 1.5 --t 0 --nl 2 --am 1,0.5 --c r --f s "
        "--glt 0 --glr 0.25 --gls 0.1 --gle 1 --dsd1 0 --dst1 1 --dsd2 8 --dst2 2 --dsr 0.75 "
        "--glsn 0.5 --glus 3,1.0,1.0,0"
    )
    assert parse_prompt_line(line) == PromptLine("p", PromptOverrides(
        "q", 8, 16, 1, (0, 5), 1.5, 0.0, 2.0, (1.0, 0.5), "r", "s",
        0, 0.25, 0.1, 1, 0, 1, 8, 2, 0.75, 0.5, "3,1.0,1.0,0",
    ))


@pytest.mark.parametrize(
    "line, expected",
    [
        ("a cat", PromptLine("a cat", PromptOverrides())),
        ("", PromptLine("", PromptOverrides())),
        ("  a  cat   --w   512   --h 640  ", PromptLine("a  cat", PromptOverrides(width=512, height=640))),
        ("a --w\t512", PromptLine("a", PromptOverrides(width=512))),
        ("a --n  x,  y  ", PromptLine("a", PromptOverrides(negative_prompt="x,  y"))),
        ("a --d 1, 2 ,3", PromptLine("a", PromptOverrides(seeds=(1, 2, 3)))),
        ("a --W 512 --H 768 --N neg --DSD1 2 --Am 0.5", PromptLine(
            "a", PromptOverrides(negative_prompt="neg", width=512, height=768, ds_depth_1=2,
                                 network_multipliers=(0.5,)))),
        ("a--b c--w 5", PromptLine("a--b c--w 5", PromptOverrides())),
        ("a -- b --", PromptLine("a -- b --", PromptOverrides())),
        ("a --n", PromptLine("a", PromptOverrides(negative_prompt=""))),
        ("a --n --w 64", PromptLine("a", PromptOverrides(negative_prompt="", width=64))),
        ("a --c", PromptLine("a", PromptOverrides(clip_prompt=""))),
        ("a --n x--y", PromptLine("a", PromptOverrides(negative_prompt="x--y"))),
        ("a {b --w 8|c} --w 16", PromptLine("a {b --w 8|c}", PromptOverrides(width=16))),
        ("a \\{b --w 8", PromptLine("a \\{b", PromptOverrides(width=8))),
        ("a \\\\{b --w 8} --h 8", PromptLine("a \\\\{b --w 8}", PromptOverrides(height=8))),
        ("a } --w 8", PromptLine("a }", PromptOverrides(width=8))),
    ],
)
def test_splitting_and_whitespace(line: str, expected: PromptLine) -> None:
    assert parse_prompt_line(line) == expected


def test_an_option_given_twice_keeps_the_last() -> None:
    assert parse_prompt_line("a --w 64 --W 128") == PromptLine(
        "a", PromptOverrides(width=128), notes=("prompt option --w given twice; the last value is used",))


@pytest.mark.parametrize(
    "line, message, option, value",
    [
        ("a --d 1,x", 'prompt option --d expects comma-separated integers, got "1,x" (e.g. --d 1,2,3,4)', "--d", "1,x"),
        ("a --s", "prompt option --s needs a value (e.g. --s 28)", "--s", None),
        ("a --s   ", "prompt option --s needs a value (e.g. --s 28)", "--s", None),
        ("a --w 500", 'prompt option --w expects a positive multiple of 8, got "500" (e.g. --w 768)', "--w", "500"),
        ("a --h 0", 'prompt option --h expects a positive multiple of 8, got "0" (e.g. --h 512)', "--h", "0"),
        ("a --w 5_12", 'prompt option --w expects a positive multiple of 8, got "5_12" (e.g. --w 768)', "--w",
         "5_12"),
        ("a --d -2", 'prompt option --d expects each value from -1 to 4294967295, got "-2" (e.g. --d 1,2,3,4)', "--d", "-2"),
        ("a --d 1,,2", 'prompt option --d expects comma-separated integers, got "1,,2" (e.g. --d 1,2,3,4)', "--d", "1,,2"),
        ("a --d 1,2,", 'prompt option --d expects comma-separated integers, got "1,2," (e.g. --d 1,2,3,4)', "--d", "1,2,"),
        ("a --t 1.5", 'prompt option --t expects a value from 0 to 1, got "1.5" (e.g. --t 0.6)', "--t", "1.5"),
        ("a --f", "prompt option --f needs a value (e.g. --f portrait_001.png)", "--f", None),
        ("a --dsd1 9", 'prompt option --dsd1 expects a value from 0 to 8, got "9" (e.g. --dsd1 3)', "--dsd1", "9"),
        ("a --gle 0", 'prompt option --gle expects a value of at least 1, got "0" (e.g. --gle 3)', "--gle", "0"),
    ],
)
def test_errors(line: str, message: str, option: str, value: str | None) -> None:
    with pytest.raises(PromptOptionError) as caught:
        parse_prompt_line(line)
    assert str(caught.value) == message
    assert (caught.value.option, caught.value.value) == (option, value)
    assert isinstance(caught.value, UserError)


# --- the table ---------------------------------------------------------------------------


def test_table_covers_every_override_once() -> None:
    fields = [field.name for field in dataclasses.fields(PromptOverrides)]
    assert sorted(option.field for option in PROMPT_OPTIONS) == sorted(fields)
    names = [option.name for option in PROMPT_OPTIONS]
    assert len(set(names)) == len(names) == 35
    assert all(name == name.lower() for name in names)


@pytest.mark.parametrize("option", PROMPT_OPTIONS, ids=lambda option: option.name)
def test_every_example_parses(option: object) -> None:
    parsed = parse_prompt_line(f"x --{option.name} {option.example}")  # type: ignore[attr-defined]
    assert getattr(parsed.overrides, option.field) is not None  # type: ignore[attr-defined]


def test_help_text() -> None:
    lines = prompt_options_help().splitlines()
    assert len(lines) == 35
    assert lines[0] == "--n TEXT        negative prompt (e.g. --n lowres, bad hands)"
    assert lines[1] == "--w INT         image width (e.g. --w 768)"
    assert lines[4] == "--d INT,...     seed of each image of the line (-1: a random one) (e.g. --d 1,2,3,4)"
    assert lines[8] == "--am FLOAT,...  multiplier of each additional network (e.g. --am 0.8,0.5)"
    assert lines[21] == "--dsr FLOAT     Deep Shrink downsampling ratio (e.g. --dsr 0.5)"
    assert lines[27] == "--cl INT        SDXL: crop left conditioned on (e.g. --cl 0)"
    assert lines[31] == "--srh INT       seed resize from this height (e.g. --srh 512)"
    assert lines[-1] == ("--style NAME    styles of the --styles file to apply, comma-separated "
                         "(e.g. --style Cinematic,Film grain)")


# --- writing back ------------------------------------------------------------------------


def test_format_prompt_line() -> None:
    line = PromptLine("a cat", PromptOverrides(
        negative_prompt="dog", width=512, seeds=(1, 2), scale=7.5, network_multipliers=(0.5, 1.0),
        ds_ratio=1e-05,
    ))
    text = format_prompt_line(line)
    assert text == "a cat --n dog --w 512 --d 1,2 --l 7.5 --am 0.5,1.0 --dsr 0.00001"
    assert parse_prompt_line(text) == line
    assert format_prompt_line(PromptLine("x", PromptOverrides())) == "x"


SAFE_TEXT = st.text(alphabet="abc ,()[]:-", max_size=12).filter(
    lambda text: " --" not in f" {text} " and text == text.strip()
)


def _value(option: object) -> st.SearchStrategy[object]:
    kind = option.kind  # type: ignore[attr-defined]
    low, high = option.minimum, option.maximum  # type: ignore[attr-defined]
    if kind in (OptionKind.TEXT, OptionKind.NAME):
        return SAFE_TEXT.filter(bool) if kind is OptionKind.NAME else SAFE_TEXT
    if option.multiple_of:  # type: ignore[attr-defined]
        return st.integers(1, 512).map(lambda n: n * 8)
    if kind in (OptionKind.INT, OptionKind.INT_LIST):
        numbers = st.integers(min_value=None if low is None else int(low),
                              max_value=10**MAX_DIGITS - 1 if high is None else int(high))
    else:
        low = low if option.name == "am" else max(low or 0.0, 0.0)  # the original reads "-" only in --am
        numbers = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    if kind in (OptionKind.INT_LIST, OptionKind.FLOAT_LIST):
        return st.lists(numbers, min_size=1, max_size=4).map(tuple)
    return numbers


@st.composite
def prompt_lines(draw: st.DrawFn) -> PromptLine:
    values = {
        option.field: draw(_value(option))
        for option in PROMPT_OPTIONS
        if draw(st.booleans())
    }
    return PromptLine(draw(SAFE_TEXT), PromptOverrides(**values))


@settings(max_examples=300, deadline=None)
@given(prompt_lines())
def test_format_then_parse_round_trips(line: PromptLine) -> None:
    assert parse_prompt_line(format_prompt_line(line)) == line


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_lines_give_a_line_or_a_user_error(text: str) -> None:
    try:
        parsed = parse_prompt_line(text)
    except PromptOptionError:
        return
    assert parsed.prompt == parsed.prompt.strip()
    assert parsed.prompt in text


# --- the original's leniency ----------------------------------------------------------------


@pytest.mark.parametrize(
    "line, prompt, overrides, unknown",
    [
        ("a --zz 3 --w 64", "a", PromptOverrides(width=64), ("--zz 3",)),
        ("a --w=512", "a", PromptOverrides(), ("--w=512",)),
        ("a ---w 5", "a", PromptOverrides(), ("---w 5",)),
    ],
)
def test_unknown_options_are_kept_for_a_warning(line, prompt, overrides, unknown) -> None:
    assert parse_prompt_line(line) == PromptLine(prompt, overrides, unknown)


def test_unknown_option_messages() -> None:
    assert unknown_option_message("--zz 3") == (
        f'unknown prompt option --zz (in "--zz 3") ignored, the line runs without it; known: {KNOWN}')


def test_sdxl_size_options_are_integers_with_bounds() -> None:
    line = parse_prompt_line("a --ow 1024 --oh 768 --nw 512 --nh 256 --ct 0 --cl 8 --s 3")
    assert line == PromptLine("a", PromptOverrides(steps=3, original_width=1024, original_height=768,
                                                   original_width_negative=512, original_height_negative=256,
                                                   crop_top=0, crop_left=8))
    assert parse_prompt_line(format_prompt_line(line)) == line
    with pytest.raises(PromptOptionError) as error:
        parse_prompt_line("a --oh 0")
    assert str(error.value) == 'prompt option --oh expects a value from 1 to 65536, got "0" (e.g. --oh 1024)'
    # read as the original reads them (its pattern `ct (\d+)`): no leading digits, left out; digits, read
    assert parse_prompt_line("a --ct -5") == PromptLine("a", PromptOverrides(), notes=(
        'prompt option --ct "-5" ignored: it does not start with a number the original reads (e.g. --ct 0)',))
    assert parse_prompt_line("a --nw 1.5") == PromptLine("a", PromptOverrides(original_width_negative=1), notes=(
        'prompt option --nw "1.5" read as 1 (only the leading "1" is read, as the original does)',))


def test_nl_none_turns_the_negative_scale_off() -> None:
    line = parse_prompt_line("a --nl none --s 4")
    assert line == PromptLine("a", PromptOverrides(steps=4), negative_scale_off=True)
    assert parse_prompt_line(format_prompt_line(line)) == line
    assert parse_prompt_line("a --nl None --nl 2").overrides.negative_scale == 2.0
    assert not parse_prompt_line("a --nl None --nl 2").negative_scale_off


# --- numbers and splitting as the original reads them -------------------------------------------
# Each expected value is what the original's own parser gives for the line (its regular
# expressions `w (\d+)`, `l ([\d.]+)`, `am ([\d.\-,]+)`, ... matched at the start of each
# " --" piece, then int()/float(); steps clamped to 1..1000; a piece that does not match or
# convert is left out); ours adds a note for the warning.

ORIGINAL_NUMBERS = [
    ("a --l 1e3", PromptOverrides(scale=1.0),
     ('prompt option --l "1e3" read as 1.0 (only the leading "1" is read, as the original does)',)),
    ("a --l 1e-3", PromptOverrides(scale=1.0),
     ('prompt option --l "1e-3" read as 1.0 (only the leading "1" is read, as the original does)',)),
    ("a --l -3", PromptOverrides(),
     ('prompt option --l "-3" ignored: it does not start with a number the original reads (e.g. --l 7.5)',)),
    ("a --l nan", PromptOverrides(),
     ('prompt option --l "nan" ignored: it does not start with a number the original reads (e.g. --l 7.5)',)),
    ("a --l 1.2.3", PromptOverrides(),
     ('prompt option --l "1.2.3" ignored: "1.2.3" is not a number (e.g. --l 7.5)',)),
    ("a --w 64abc", PromptOverrides(width=64),
     ('prompt option --w "64abc" read as 64 (only the leading "64" is read, as the original does)',)),
    ("a --w -64", PromptOverrides(),
     ('prompt option --w "-64" ignored: it does not start with a number the original reads (e.g. --w 768)',)),
    ("a --s 28.0", PromptOverrides(steps=28),
     ('prompt option --s "28.0" read as 28 (only the leading "28" is read, as the original does)',)),
    ("a --s 0", PromptOverrides(steps=1), ("prompt option --s 0 read as 1 (the original keeps it within 1 to 1000)",)),
    ("a --s 5000", PromptOverrides(steps=1000),
     ("prompt option --s 5000 read as 1000 (the original keeps it within 1 to 1000)",)),
    ("a --s " + "9" * 30, PromptOverrides(steps=1000),
     ("prompt option --s " + "9" * 30 + " read as 1000 (the original keeps it within 1 to 1000)",)),
    ("a --glt 750.0", PromptOverrides(),
     ('prompt option --glt "750.0" ignored: "750.0" is not an integer (e.g. --glt 650)',)),
    ("a --dsd1 2.5", PromptOverrides(),
     ('prompt option --dsd1 "2.5" ignored: "2.5" is not an integer (e.g. --dsd1 3)',)),
    ("a --dsr 0.5x", PromptOverrides(ds_ratio=0.5),
     ('prompt option --dsr "0.5x" read as 0.5 (only the leading "0.5" is read, as the original does)',)),
    ("a --am 0.5,-1", PromptOverrides(network_multipliers=(0.5, -1.0)), ()),
    ("a --am 0.5, 1", PromptOverrides(),
     ('prompt option --am "0.5, 1" ignored: "0.5," is not comma-separated numbers (e.g. --am 0.8,0.5)',)),
    ("a --nl -2", PromptOverrides(),
     ('prompt option --nl "-2" ignored: it does not start with a number the original reads (e.g. --nl 5)',)),
    ("a --t 0.5abc", PromptOverrides(strength=0.5),
     ('prompt option --t "0.5abc" read as 0.5 (only the leading "0.5" is read, as the original does)',)),
]


@pytest.mark.parametrize("line, overrides, notes", ORIGINAL_NUMBERS, ids=[case[0] for case in ORIGINAL_NUMBERS])
def test_numbers_are_read_as_the_original_reads_them(line: str, overrides: PromptOverrides, notes) -> None:
    assert parse_prompt_line(line) == PromptLine("a", overrides, notes=notes)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("--n x --w 64", PromptLine("--n x", PromptOverrides(width=64))),  # at the very start: prompt text
        ("a\t--w 64", PromptLine("a\t--w 64", PromptOverrides())),  # after a tab: prompt text
        ("a\t--w 64 --h 8", PromptLine("a\t--w 64", PromptOverrides(height=8))),
        ("a --d 1,2 --d 3", PromptLine("a", PromptOverrides(seeds=(1, 2)),
                                       notes=("prompt option --d given twice; the first value is used",))),
    ],
)
def test_splitting_as_the_original(line: str, expected: PromptLine) -> None:
    assert parse_prompt_line(line) == expected


def test_notes_are_warned_with_the_file_and_line(caplog: pytest.LogCaptureFixture) -> None:
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Defaults, Line, jobs_for_line

    defaults = Defaults(64, 64, 3, 7.5, None, 1)
    with caplog.at_level("WARNING", logger="library.prompts.sources"):
        jobs = list(jobs_for_line(Line("a --s 5000 --d 4", "p.txt:7"), defaults, SeedSource(None, False), None,
                                  lambda *parts: 1))
    assert [job.steps for job in jobs] == [1000]
    assert caplog.messages == ["p.txt:7: prompt option --s 5000 read as 1000 (the original keeps it within 1 to 1000)"]
