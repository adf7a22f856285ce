"""Running a sweep (`--xyz`, `--prompt_matrix`): its cell lines through the Runner, then the grids.

Each prompt line gets its seeds first (`--d` as written, else drawn now, one per image), so
every cell of the line has the same seeds unless a `seed` axis changes them; then its cell
lines (`library.prompts.sweeps`) run like any prompt lines (batched where their settings
allow). After each round, one grid PNG per prompt line and Z value is written next to the images
(`library.images.grids`): `xyz_grid_<timestamp>_<round>_<grid>.png`. In a split run
(torchrun) each process saves its own images; the first process gathers the list of every
process's files and draws the grids (from a shared `--outdir`; a file it cannot read leaves its
grid out, with a warning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from library.images import grids, output_files
from library.prompts import sweeps
from library.prompts.line_options import format_prompt_line, parse_prompt_line, without_seeds
from library.prompts.seeds import SeedSource, seeds_for_line
from library.prompts.sources import Line
from library.records.options import RoundOptions

logger = logging.getLogger(__name__)


def _seeded(text: str, seeds: SeedSource, per_prompt: int, iter_seed: int | None) -> str:
    """`text` with the seeds of its images written out (`--d`)."""
    parsed = parse_prompt_line(text)
    if parsed.overrides.seeds:
        return text
    drawn = seeds_for_line(seeds, per_prompt, None, iter_seed)
    return format_prompt_line(replace(parsed, overrides=replace(parsed.overrides, seeds=tuple(drawn))))


def plan(rounds: RoundOptions, lines: list[Line], seeds: SeedSource, per_prompt: int,
         iter_seed: int | None) -> tuple[list[Line], list[sweeps.SweepCell], list[sweeps.GridPlan]]:
    """The cell lines of one round (each named after its prompt line), where each goes, and the grids."""
    axes = [sweeps.parse_axis(text) for text in rounds.sweep]
    made: list[Line] = []
    cells: list[sweeps.SweepCell] = []
    plans: list[sweeps.GridPlan] = []
    for line in lines:
        text = _seeded(line.text, seeds, per_prompt, iter_seed)
        if rounds.prompt_matrix:
            mine, grids_of_line = sweeps.prompt_matrix(text)
        else:
            sweeps.check_search(axes, [text])
            mine, grids_of_line = sweeps.sweep([text], axes)
        for number, (cell_text, cell) in enumerate(mine, 1):
            made.append(Line(cell_text, f"{line.where} (cell {number})", image=line.image))
            cells.append(replace(cell, grid=cell.grid + len(plans)))
        plans += grids_of_line
    return made, cells, plans


def run_sweep(runner, rounds: RoundOptions, lines: list[Line], seeds: SeedSource, per_prompt: int,
              team) -> list[Path]:
    """Every round of the sweep; returns the grid files written (by the first process of a split run)."""
    written: list[Path] = []
    for round_index in range(rounds.n_iter):
        iter_seed = seeds.draw() if rounds.iter_same_seed else None
        cell_lines, cells, plans = plan(rounds, lines, seeds, per_prompt, iter_seed)
        start = len(runner.saved)
        runner.run(runner.jobs(cell_lines, seeds, iter_seed), len(cell_lines) * per_prompt)
        saved = collect(team, [(job.raw_prompt, job.index, str(path)) for job, path in runner.saved[start:]])
        if saved is not None:
            written += _grids(runner, saved, cell_lines, cells, plans, round_index)
    return written


def collect(team, saved: list[tuple[str, int, str]]) -> list[tuple[str, int, str]] | None:
    """Every process's saved images (prompt line, Job index, file) in Job order, for the first
    process; None for the others. Every process of a split run must call it (it gathers)."""
    if team.size == 1:
        return saved
    everyone = team.gather({"saved": saved})
    if not team.leads:
        return None
    return sorted((tuple(item) for part in everyone for item in part["saved"]), key=lambda item: item[1])


def _grids(runner, saved, cell_lines: Iterable[Line], cells, plans, round_index: int) -> list[Path]:
    """Write the round's grids from the images saved for its cell lines."""
    by_text: dict[str, list[Path]] = {}
    for text, _index, path in saved:
        by_text.setdefault(text, []).append(Path(path))
    tables = [[[None] * len(p.columns) for _ in p.rows] for p in plans]
    for line, cell in zip(cell_lines, cells):
        paths = by_text.get(without_seeds(line.text))  # a Job's raw prompt is its line less `--d`
        tables[cell.grid][cell.y][cell.x] = paths.pop(0) if paths else None
        if paths is not None and runner.defaults.images_per_prompt > 1:
            del paths[: runner.defaults.images_per_prompt - 1]  # a cell shows its first image
    written = []
    for number, (grid_plan, table) in enumerate(zip(plans, tables)):
        try:
            image, description = grids.make_grid(grid_plan.title, list(grid_plan.columns), list(grid_plan.rows),
                                                 table)
        except OSError as exc:  # a split run over machines without a shared --outdir
            logger.warning("sweep grid %d not drawn: cannot read its images (%s)", number, exc)
            continue
        name = f"xyz_grid_{runner.output.timestamp}_{round_index:02d}_{number:03d}.png"
        written.append(output_files.save_image(image, runner.output.outdir, name,
                                               {"grid": json.dumps(description, ensure_ascii=False)}))
    return written
