"""The one exception type for user mistakes, and the helper that keeps its messages short.

A `UserError` is raised for anything the user can fix (a missing file, a bad option, an
unreadable image, an incompatible LoRA). `gen_img.py` prints its message as one line and
exits with status 2, without a traceback. Anything else is a bug and may raise normally.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the file or option and the fix."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of `exc`'s message (surrounding blank space dropped), at most `limit`
    characters; the exception's type name when the message is empty.

    For quoting a library's (often multi-line) error inside a one-line `UserError`.
    """
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
