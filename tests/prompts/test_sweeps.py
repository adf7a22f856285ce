"""Sweep axes and the prompt matrix as prompt lines (no model)."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library.prompts.sweeps import SweepCell, check_cells, check_search, parse_axis, prompt_matrix, sweep


@pytest.mark.parametrize(("text", "values"), [
    ("steps: 10-30 [3]", ("10", "20", "30")),
    ("Steps: 1-4", ("1", "2", "3", "4")),
    ("seed: 10-4 (-3)", ("10", "7", "4")),
    ("CFG Scale: 5-7 (+0.5)", ("5", "5.5", "6", "6.5", "7")),
    ("cfg: 4-8 [3]", ("4", "6", "8")),
    ("sampler: Euler a, DPM++ 2M Karras", ("Euler a", "DPM++ 2M Karras")),
    ('prompt s/r: cat, "dog, big", fox', ("cat", "dog, big", "fox")),
    ("lora multiplier: 0, 0.5, 1", ("0", "0.5", "1")),
    ("deep shrink ratio: 0.4-0.6 [3]", ("0.4", "0.5", "0.6")),
])
def test_axis_values(text, values):
    assert parse_axis(text).values == values


@pytest.mark.parametrize(("text", "message"), [
    ("colour: red", '--xyz "colour: red": unknown axis "colour"; write "NAME: values" with NAME one of '),
    ("steps: 0-2", '--xyz "steps: 0-2": prompt option --s 0 read as 1 (the original keeps it within 1 to 1000)'),
    ("steps: 1-5 (-1)", '--xyz "steps: 1-5 (-1)": the step of 1-5 (-1) never reaches its end'),
    ("sampler: DPM fast", "--sampler DPM fast: not available (diffusers has no fixed-step DPM-Solver-fast); "
     "the closest here is --sampler dpmsolver++"),
])
def test_bad_axes_are_one_line(text, message):
    with pytest.raises(UserError) as exc:
        parse_axis(text)
    assert str(exc.value).startswith(message)


def test_ten_thousand_cells_are_refused():
    with pytest.raises(UserError) as exc:
        check_cells([parse_axis("steps: 1-100"), parse_axis("seed: 1-100")])
    assert str(exc.value) == "--xyz: 100 x 100 = 10000 cells per prompt line; at most 1000"


def test_prompt_search_and_replace_and_cell_order():
    cells, grids = sweep(["a cat --n no cat --s 4"], [parse_axis("steps: 1, 2"), parse_axis("prompt s/r: cat, dog")])
    assert cells == [
        ("a cat --n no cat --s 1", SweepCell(0, 0, 0)), ("a cat --n no cat --s 2", SweepCell(0, 1, 0)),
        ("a dog --n no dog --s 1", SweepCell(0, 0, 1)), ("a dog --n no dog --s 2", SweepCell(0, 1, 1)),
    ]
    assert (grids[0].title, grids[0].columns, grids[0].rows) == (
        "a cat", ("steps: 1", "steps: 2"), ("prompt s/r: cat", "prompt s/r: dog"))
    with pytest.raises(UserError) as exc:
        check_search([parse_axis("prompt s/r: horse, dog")], ["a cat --n blur"])
    assert str(exc.value) == ('--xyz "prompt s/r: ...": "horse" is not in the prompt "a cat" nor in its negative '
                              "prompt; Prompt S/R replaces its first value")


def test_prompt_matrix_makes_every_subset():
    cells, (grid,) = prompt_matrix("a house | red | at night --s 5")
    assert [text for text, _ in cells] == ["a house --s 5", "a house, red --s 5", "a house, at night --s 5",
                                           "a house, red, at night --s 5"]
    assert [(c.x, c.y) for _, c in cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert (grid.columns, grid.rows) == (("-", "red"), ("-", "at night"))
