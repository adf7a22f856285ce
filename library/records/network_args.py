"""`--network_args`: one ``"k=v,k2=v2"`` text per network, read without any model (so a typo is
refused before the model loads, `library.cli.preflight`, with the same line the loader gives)."""

from __future__ import annotations

from library.errors import UserError


def parse_network_args(text: str) -> dict[str, str]:
    """`--network_args "k=v,k2=v2"` as a dict."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f'--network_args "{text}": expected key=value items separated by commas')
        pairs[key.strip()] = value.strip()
    return pairs
