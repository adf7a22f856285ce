"""`--from_file`: a prompt file read line by line, so memory does not grow with the file.

One prompt per line; blank lines and `#` lines are skipped; a UTF-8 byte-order mark is
ignored. The file is read again each time it is iterated (each `--n_iter` round), so a
1 GB file is never held in memory: `len()` counts its prompt lines in one streaming pass
(for the progress total and the seed rule), and only `--shuffle_prompts` makes a list of it.
A line longer than `MAX_LINE_BYTES` is never held either: it becomes a `Line` with a
`problem`, which the run reports with its file and line and skips. A file that is not UTF-8
is one error line (status 2), found by the count before any model loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from library.errors import UserError
from library.prompts.sources import Line

#: The longest prompt line read, in bytes (a 200,000-alternative `{a|b|...}` group is ~1.5 MB).
MAX_LINE_BYTES = 4 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_COUNTS: dict[tuple, int] = {}  # (path, inode, size, mtime) of the last file counted -> its prompt lines


def _stamp(path: str) -> tuple | None:
    """What identifies one version of the file (None when it cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), info.st_ino, info.st_size, info.st_mtime_ns)


class PromptFile:
    """The prompt lines of one file, streamed on every iteration."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._count: int | None = None

    def __len__(self) -> int:
        """How many prompt lines the file has (counted without keeping them; once per version of
        the file, so the start-up check and the run share one pass over a large file)."""
        if self._count is None:
            stamp = _stamp(self.path)
            if stamp is None or stamp not in _COUNTS:
                count = sum(1 for _ in self)
                if stamp is not None:
                    _COUNTS.clear()
                    _COUNTS[stamp] = count
                self._count = count
            else:
                self._count = _COUNTS[stamp]
        return self._count

    def __iter__(self) -> Iterator[Line]:
        try:
            file = open(self.path, "rb")  # closed by the with below, also when the loop is abandoned
        except OSError as exc:
            raise UserError(f"--from_file {self.path}: cannot read it ({exc.strerror})") from None
        with file:
            yield from self._lines(file)

    def _lines(self, file: BinaryIO) -> Iterator[Line]:
        for number, raw in enumerate(_raw_lines(file), 1):
            where = f"{self.path}:{number}"
            if raw is None:
                yield Line("", where, problem=f"the line is longer than {MAX_LINE_BYTES} bytes; "
                                              "split it or shorten its {a|b|...} groups")
                continue
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"--from_file {self.path}: not UTF-8 text (line {number}); save it as UTF-8") from None
            if text and not text.startswith("#"):
                yield Line(text, where)


def _raw_lines(file: BinaryIO) -> Iterator[bytes | None]:
    """Each line's bytes, or None for a line over `MAX_LINE_BYTES` (read past, never held whole)."""
    while True:
        chunk = file.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):
                chunk = file.readline(MAX_LINE_BYTES)
            yield None
            continue
        yield chunk
