"""The one exception type for user mistakes.

A `UserError` is raised for anything the user can fix (a missing file, a bad option, an
unreadable image, an incompatible LoRA). `gen_img.py` prints its message as one line and
exits with status 2, without a traceback. Anything else is a bug and may raise normally.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the file or option and the fix."""
