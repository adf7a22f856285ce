"""Making text from anywhere (our errors, a library's exception) fit one clean terminal line.

Libraries put terminal escape codes into their messages (torch's `weights_only` error opens
bold with ``ESC[1m``), newlines, tabs, and sometimes thousands of characters of a value the
user typed. `one_line` removes escape codes and control characters, joins the lines and cuts
the text at a word boundary, so the error line can never leave the terminal bold or fill it.
`quiet_third_party` keeps libraries' warnings and log records off the user's screen; what
matters reaches the user as our own one-line error.
"""

from __future__ import annotations

import errno
import logging
import os
import re

#: Longest one-line message, in characters, before it is cut at a word boundary.
MAX_MESSAGE = 400
#: Longest quoted value (a prompt-option value, an argument) shown inside a message.
MAX_QUOTED = 40

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), and two-character ESC sequences.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_QUOTED_VALUE = re.compile(rf"'([^']{{{MAX_QUOTED + 1},}})'")
_THIRD_PARTY = ("diffusers", "transformers", "huggingface_hub", "PIL", "accelerate", "safetensors", "torch")


def strip_escapes(text: str) -> str:
    """`text` without terminal escape sequences; other control characters become spaces."""
    return _CONTROL.sub(" ", _ESCAPE.sub("", text))


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with "..." when cut."""
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 3, 1)]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:(.") + "..."


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one clean line: no escape codes or control characters, whitespace runs
    collapsed, at most `limit` characters (cut at a word boundary)."""
    return shorten(_SPACES.sub(" ", strip_escapes(text)).strip(), limit)


def quoted(value: str, limit: int = MAX_QUOTED) -> str:
    """A user's value for a message: clean, and cut in the middle of a long run of
    characters too (a 4,000-digit number has no word boundary)."""
    clean = _SPACES.sub(" ", strip_escapes(value)).strip()
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def argparse_text(message: str) -> str:
    """An argparse error with long quoted values (``invalid int value: '999...'``) cut short."""
    return one_line(_QUOTED_VALUE.sub(lambda m: "'" + quoted(m.group(1)) + "'", message))


def write_failure(outdir: object, name: str, exc: OSError) -> str:
    """The message for an image that could not be written: "disk full" when it is."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"--outdir {outdir}: disk full while writing {name}; free some space (nothing partial was left)"
    return f"--outdir {outdir}: cannot write {name} ({exc.strerror}); free space or fix permissions"


def quiet_third_party() -> None:
    """Libraries' warnings and log records below CRITICAL stay off the screen.

    Their problems surface as exceptions, which become our one-line errors; their chatter
    ("An error occurred while trying to fetch ...", FutureWarnings) would only come first.
    Python warnings go to the `py.warnings` logger, shown only at DEBUG level.
    """
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # read when they are imported
        os.environ.setdefault(variable, "critical")
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.CRITICAL)
