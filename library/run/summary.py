"""What a run produced: the summary line and the exit status.

A run that wrote no image because its prompt lines were all skipped exits with status 1; one
that made its images but skipped some prompt lines exits with `SOME_LINES_SKIPPED` (3), and its
summary line says how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from library.messages import one_line


@dataclass
class Summary:
    """What a run did (one process's part of it, or the whole run after `combined`)."""

    written: list[Path] = field(default_factory=list)
    skipped_lines: int = 0
    seconds: float = 0.0
    steps: int = 0
    first_skip: str | None = None  # why the first skipped line was skipped
    existing: int = 0  # images not made because their files were there (`--skip_existing`)
    shares: tuple[int, ...] = ()  # images written by each process of a split run

    def line(self) -> str:
        return summary_line(self)

    def to_dict(self) -> dict:
        """The summary as JSON-able data, for gathering from every process."""
        return {"written": [str(p) for p in self.written], "skipped_lines": self.skipped_lines,
                "seconds": self.seconds, "steps": self.steps, "first_skip": self.first_skip,
                "existing": self.existing}


def combined(parts: list[dict]) -> Summary:
    """The whole run's summary from every process's `Summary.to_dict()` (rank order).

    Every process reads every prompt line, so the skipped lines are counted once (rank 0's);
    images, steps and already-there images add up; the time is the slowest process's."""
    if len(parts) == 1:
        only = parts[0]
        return Summary([Path(p) for p in only["written"]], only["skipped_lines"], only["seconds"], only["steps"],
                       only["first_skip"], only["existing"])
    return Summary(
        written=[Path(p) for part in parts for p in part["written"]],
        skipped_lines=parts[0]["skipped_lines"],
        seconds=max(part["seconds"] for part in parts),
        steps=sum(part["steps"] for part in parts),
        first_skip=parts[0]["first_skip"],
        existing=sum(part["existing"] for part in parts),
        shares=tuple(len(part["written"]) for part in parts),
    )


def summary_line(summary: Summary) -> str:
    """The last line of a run: images written (or none), by how many processes, lines skipped
    and why, images already there, time per step."""
    count = len(summary.written)
    skipped = ""
    if summary.skipped_lines:
        lines = f"{summary.skipped_lines} prompt line{'' if summary.skipped_lines == 1 else 's'}"
        skipped = f"{lines} skipped (first: {one_line(summary.first_skip or '', 240)})"
    if not count and not summary.existing and skipped:
        return f"no image written: {skipped}"
    rate = f", {summary.seconds / summary.steps:.2f} s/it" if summary.steps else ""
    by = ""
    if summary.shares:
        by = f" by {len(summary.shares)} processes ({' + '.join(str(n) for n in summary.shares)})"
    text = f"{count} image{'' if count == 1 else 's'} written{by} in {summary.seconds:.1f} s{rate}"
    if summary.existing:
        there = summary.existing
        text += f"; {there} image{'' if there == 1 else 's'} already there (--skip_existing)"
    return f"{text}; {skipped}" if skipped else text


#: The exit status of a run that made the images of some prompt lines and skipped others.
SOME_LINES_SKIPPED = 3


def exit_status(summary: Summary) -> int:
    """0 when every line's images were written or were there already (or nothing was asked
    for), 1 when every line was skipped, `SOME_LINES_SKIPPED` when some were."""
    if not summary.skipped_lines:
        return 0
    return SOME_LINES_SKIPPED if summary.written or summary.existing else 1
