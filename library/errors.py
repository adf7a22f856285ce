"""The one exception type for user mistakes, and the helper that keeps its messages short.

A `UserError` is raised for anything the user can fix (a missing file, a bad option, an
unreadable image, an incompatible LoRA). `gen_img.py` prints its message as one line and
exits with its `exit_status` (2), without a traceback. Anything else is a bug and may raise
normally.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the file or option and the fix."""

    #: The process exit status for this error.
    exit_status = 2


class NothingToDo(UserError):
    """The input is readable but asks for no image (an empty prompt file): exit status 1."""

    exit_status = 1


class NonFiniteResult(UserError):
    """The computation went NaN/infinite (a model or precision problem, not the input): exit status 1.

    Raised instead of saving a black image as if it were a result.
    """

    exit_status = 1

def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first non-empty line of `exc`'s message, without terminal escape codes, cut at a word
    boundary to at most `limit` characters ("..." when cut); its type name when the message is empty.

    For quoting a library's (often multi-line) error inside a one-line `UserError`.
    """
    from library.messages import one_line, strip_escapes

    for line in str(exc).splitlines():
        line = strip_escapes(line)
        if line.strip():
            return one_line(line, limit or len(line))
    return type(exc).__name__
