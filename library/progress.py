"""Progress bars on a terminal, plain lines everywhere else.

tqdm redraws its bar with carriage returns and cursor codes, which in a log file or a CI
console become one line per redraw. `progress` gives tqdm's bar when stderr is a terminal
and otherwise a `LineProgress`: the images bar logs one line per update ("images 3/8,
12.4 s"), the steps bar one line at most every `STEP_LINE_SECONDS` (a long image still shows
that it is alive) and nothing else. Both take the arguments of tqdm that this project uses.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)

#: Seconds between two "steps" lines when stderr is not a terminal.
STEP_LINE_SECONDS = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             leave: bool = True, disable: bool = False):
    """tqdm on a terminal, a `LineProgress` otherwise (same use: iterate, `update`, `with`)."""
    if disable or not _is_terminal():
        every = desc != "steps"
        return LineProgress(iterable, total=total, desc=desc, every_update=every, disable=disable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)


def _is_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


class LineProgress:
    """Progress as log lines: one per `update` (`every_update`), else at most one per interval."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 every_update: bool = True, disable: bool = False, interval: float = STEP_LINE_SECONDS) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.every_update, self.disable, self.interval = desc, every_update, disable, interval
        self.n = 0
        self._start = self._last = time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        """Count `n` more done; log a line when due."""
        self.n += n
        now = time.perf_counter()
        if self.disable or not (self.every_update or now - self._last >= self.interval):
            return
        self._last = now
        of = f"/{self.total}" if self.total else ""
        logger.info("%s %d%s, %.1f s", self.desc, self.n, of, now - self._start)

    def close(self) -> None:
        return None


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
