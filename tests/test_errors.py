"""Tests for library/errors.py: the first-line helper used inside one-line UserErrors."""

from __future__ import annotations

from library.errors import first_line


def test_first_line_of_multi_line_message():
    assert first_line(RuntimeError("\n  first problem\nsecond line\n")) == "first problem"


def test_first_line_of_empty_message_is_the_type_name():
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("  \n ")) == "OSError"


def test_first_line_limit():
    assert first_line(RuntimeError("x" * 300)) == "x" * 197 + "..."
    assert first_line(RuntimeError("bad thing happened here"), 16) == "bad thing..."  # cut at a word
    assert first_line(RuntimeError("y" * 300), None) == "y" * 300
    assert first_line(RuntimeError("\x1b[1mbold\x1b[0m  text")) == "bold text"  # no escape codes left
