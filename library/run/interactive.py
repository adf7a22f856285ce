"""The interactive mode's terminal: the `Type prompt:` question, kept apart from log lines, and
one line per image written (its seed and file), so the user sees what each prompt made.

A log line emitted while the question waits for input (a background model hash, a library's
warning) would land after `Type prompt: ` on the same line; `read_prompt` marks the question
as pending, and a filter on the root logger's handlers ends that line first.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

QUESTION = "Type prompt: "


class _EndsTheQuestion(logging.Filter):
    """Writes a newline to stdout before the first log record while the question is pending."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pending:
            self.pending = False
            sys.stdout.write("\n")
            sys.stdout.flush()
        return True


_filter = _EndsTheQuestion()


def read_prompt(question: str = QUESTION) -> str:
    """`input(question)`, with log records kept off the question's line."""
    for handler in logging.getLogger().handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)
        handler.flush()
    sys.stdout.flush()
    _filter.pending = True
    try:
        return input(question)
    finally:
        _filter.pending = False


def announce(seed: int, path: Path) -> None:
    """The line printed after each image of an interactive prompt."""
    print(f"seed {seed}: {path}", flush=True)
