"""The web UI's prompt editing `[from:to:when]` and alternation `[a|b|c]`: a prompt's text per step.

Syntax (the web UI's, nested freely and mixed with `(word:1.2)` weights, which are kept as
text for `library.text.weighting`):

- ``[from:to:when]``: ``from`` until step ``when``, ``to`` after it; ``[to:when]`` adds ``to``
  after step ``when``; ``[from::when]`` removes ``from`` after it. ``when`` is a number >= 0: a
  whole number is a step, a number below 1 a fraction of the steps (``int(when * steps)``);
  past the last step it is the last step. So at 6 steps ``[a:b:3]`` and ``[a:b:0.5]`` are
  ``a`` at steps 1-3 and ``b`` at 4-6, ``[a:b:0]`` is ``b`` throughout, ``[a:b:100]`` ``a``.
- ``[a|b|c]``: option ``(step - 1) % 3`` at each step (1-based); an option may be empty.
- ``[text]`` without ``:`` or ``|`` at its top level stays as it is (the weight 1/1.1).
- ``\\[`` ``\\]`` ``\\:`` ``\\|`` and any backslash escape are kept as written (plain text).
- ``:`` and ``|`` inside ``( )`` belong to the weight syntax, not to the bracket around them.

A prompt without such brackets comes back unchanged at every step (`has_editing` is False),
so it is encoded as before. Mistakes are a `UserError` naming the bracket: ``when`` not a
number or below 0, more than three ``:`` parts, ``:`` and ``|`` mixed, or a ``[`` with a
top-level ``:`` or ``|`` that is never closed. (A ``[`` or ``]`` without editing syntax that
is not balanced stays literal text, as the weight syntax reads it.)

Written by hand from the web UI's documented behaviour (its parser is a grammar in another
project; no maintained library parses this syntax).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from library.errors import UserError

MAX_DEPTH = 100  # brackets nested deeper than this are read as plain text (no recursion crash)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Group:
    """Literal brackets around nodes: ``(...)`` or ``[...]`` (a close of "" when never closed)."""

    open: str
    children: tuple
    close: str


@dataclass(frozen=True)
class Edit:
    """``[before:after:when]``."""

    before: tuple
    after: tuple
    when: float


@dataclass(frozen=True)
class Alternation:
    options: tuple[tuple, ...]


def has_editing(prompt: str) -> bool:
    """True when `prompt` has a prompt-editing or alternation bracket (False: its text is the same at every step)."""
    if "[" not in prompt:
        return False
    return _has_edit_nodes(parse(prompt))


def _has_edit_nodes(nodes: tuple) -> bool:
    for node in nodes:
        if isinstance(node, (Edit, Alternation)):
            return True
        if isinstance(node, Group) and _has_edit_nodes(node.children):
            return True
    return False


def text_at(prompt: str, step: int, steps: int) -> str:
    """The prompt's text at `step` (1-based) of `steps`."""
    if "[" not in prompt:
        return prompt
    return _render(parse(prompt), step, steps)


def schedule(prompt: str, steps: int) -> tuple[str, ...]:
    """The prompt's text at steps 1..`steps`."""
    if "[" not in prompt:
        return (prompt,) * steps
    nodes = parse(prompt)
    return tuple(_render(nodes, step, steps) for step in range(1, steps + 1))


@lru_cache(maxsize=1024)
def parse(prompt: str) -> tuple:
    """The prompt as nodes: str (text as written), `Group`, `Edit`, `Alternation`."""
    parser = _Parser(prompt)
    nodes, _ = parser.sequence(0, "", 0)
    return nodes


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def sequence(self, pos: int, stops: str, depth: int) -> tuple[tuple, int]:
        """Nodes from `pos` up to (not past) a character of `stops` or the end."""
        text, nodes, plain = self.text, [], []
        if depth > MAX_DEPTH:  # the rest is plain text (the weight syntax reads it); no recursion crash
            return (text[pos:],), len(text)
        while pos < len(text):
            char = text[pos]
            if char in stops:
                break
            if char == "\\" and pos + 1 < len(text):
                plain.append(text[pos:pos + 2])
                pos += 2
                continue
            if char in "([":
                if plain:
                    nodes.append("".join(plain))
                    plain = []
                node, pos = (self.paren if char == "(" else self.bracket)(pos, depth + 1)
                nodes.extend(node)
                continue
            plain.append(char)
            pos += 1
        if plain:
            nodes.append("".join(plain))
        return tuple(nodes), pos

    def paren(self, pos: int, depth: int) -> tuple[tuple, int]:
        children, end = self.sequence(pos + 1, ")", depth)
        closed = end < len(self.text)
        return (Group("(", children, ")" if closed else ""),), end + closed

    def bracket(self, pos: int, depth: int) -> tuple[tuple, int]:
        """``[...]``: its parts split at top-level ``:`` / ``|``, then what they make."""
        parts, separators, cursor = [], [], pos + 1
        while True:
            nodes, cursor = self.sequence(cursor, ":|]", depth)
            parts.append(nodes)
            if cursor >= len(self.text):
                if separators:
                    raise UserError(f"'[' at character {pos + 1} of the prompt is never closed "
                                    f"(prompt editing is [from:to:when], alternation [a|b])")
                return ("[", *parts[0]), cursor  # a literal '[' (the weight syntax reads it)
            char = self.text[cursor]
            cursor += 1
            if char == "]":
                break
            separators.append(char)
        source = self.text[pos:cursor]
        if not separators:
            return (Group("[", parts[0], "]"),), cursor
        if set(separators) == {"|"}:
            return (Alternation(tuple(parts)),), cursor
        if "|" in separators:
            raise UserError(f"{source}: ':' and '|' mixed in one bracket (prompt editing is [from:to:when], "
                            "alternation [a|b])")
        if len(parts) > 3:
            raise UserError(f"{source}: too many ':' (prompt editing is [from:to:when])")
        when = _when(source, parts[-1])
        before, after = (parts[0], parts[1]) if len(parts) == 3 else ((), parts[0])
        return (Edit(before, after, when),), cursor


def _when(source: str, nodes: tuple) -> float:
    text = "".join(n for n in nodes if isinstance(n, str)).strip()
    if any(not isinstance(n, str) for n in nodes) or not _NUMBER.fullmatch(text):
        raise UserError(f"{source}: '{text}' is not a number (prompt editing is [from:to:when], "
                        "when a step or a fraction of the steps)")
    value = float(text)
    if not math.isfinite(value):
        raise UserError(f"{source}: '{text}' is not a number (prompt editing is [from:to:when])")
    if value < 0:
        raise UserError(f"{source}: when {text} is below 0 (a step, or a fraction of the steps below 1)")
    return value


def distinct_texts(prompts: tuple[str, ...] | list[str], steps: int) -> tuple[str, ...]:
    """Every text `prompts` have at some step of `steps`, each once, in order of appearance."""
    return tuple(dict.fromkeys(text for prompt in prompts for text in schedule(prompt, steps)))


def switch_step(when: float, steps: int) -> int:
    """The last step of `before`: `when` steps, or `int(when * steps)` for a fraction; at most `steps`."""
    return min(steps, int(when * steps) if when < 1 else int(when))


def _render(nodes: tuple, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Group):
            out.append(node.open + _render(node.children, step, steps) + node.close)
        elif isinstance(node, Edit):
            chosen = node.before if step <= switch_step(node.when, steps) else node.after
            out.append(_render(chosen, step, steps))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)
