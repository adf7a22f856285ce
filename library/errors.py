"""The one exception type for user mistakes.

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
