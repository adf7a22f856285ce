"""Print the metadata of model and image files without loading any weights.

    python tools/show_metadata.py FILE...        (or: python -m tools.show_metadata FILE...)

`.safetensors`: the header's `__metadata__` (training settings of LoRAs and checkpoints;
values that hold JSON are pretty-printed) and a summary of the tensors (count, dtypes,
parameter count), read from the 8-byte length and JSON header only.
Images (`.png`, `.webp`, `.jpg`): every text item and, when there is an A1111 `parameters`
item, its parsed fields. A damaged or unsupported file prints one line to stderr; the exit
status is 2 if any file failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError
from library.images.metadata import parse_a1111_parameters, read_generation_text

logger = logging.getLogger(__name__)

# The safetensors format refuses headers over 100 MB; a bigger length means a damaged file.
MAX_HEADER_BYTES = 100_000_000
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


def read_safetensors_header(path: Path) -> dict:
    """The parsed JSON header of a safetensors file; damage -> UserError (one line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: damaged safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(head, "little")
            f.seek(0, 2)
            size = f.tell()
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise UserError(
                    f"{path}: damaged safetensors header (says {length} bytes, file has {size - 8}); re-download it"
                )
            f.seek(8)
            raw = f.read(length)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged safetensors header (not JSON: {e}); re-download it") from e
    if not isinstance(header, dict):
        raise UserError(f"{path}: damaged safetensors header (not a JSON object); re-download it")
    return header


def _pretty_value(value: object) -> str:
    """A metadata value; strings holding a JSON object or list are pretty-printed."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            try:
                return json.dumps(json.loads(stripped), indent=2, ensure_ascii=False)
            except json.JSONDecodeError:
                pass
        return value
    return json.dumps(value, ensure_ascii=False)


def _indent(text: str, prefix: str = "    ") -> str:
    """Indent continuation lines so multi-line values stay under their key."""
    return text.replace("\n", "\n" + prefix)


def describe_safetensors(path: Path) -> list[str]:
    """Report lines for one safetensors file."""
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    dtypes: Counter[str] = Counter()
    parameters = 0
    for name, info in header.items():
        if not isinstance(info, dict) or "dtype" not in info or "shape" not in info:
            raise UserError(f"{path}: damaged safetensors header (entry {name!r} has no dtype/shape); re-download it")
        dtypes[str(info["dtype"])] += 1
        parameters += math.prod(int(n) for n in info["shape"])
    summary = ", ".join(f"{dtype}: {count}" for dtype, count in sorted(dtypes.items()))
    lines = [f"{path}", f"  tensors: {len(header)} ({summary or 'none'}), parameters: {parameters:,}"]
    if not metadata:
        lines.append("  metadata: none")
    else:
        lines.append("  metadata:")
        for key in sorted(metadata):
            lines.append(f"    {key}: {_indent(_pretty_value(metadata[key]), '      ')}")
    return lines


def describe_image(path: Path) -> list[str]:
    """Report lines for one image file."""
    text = read_generation_text(path)
    lines = [f"{path}"]
    if not text:
        lines.append("  text: none")
    else:
        lines.append("  text:")
        for key, value in text.items():
            lines.append(f"    {key}: {_indent(value, '      ')}")
    if "parameters" in text:
        lines.append("  A1111 parameters:")
        for key, value in parse_a1111_parameters(text["parameters"]).items():
            lines.append(f"    {key}: {_indent(value, '      ')}")
    return lines


def describe(path: Path) -> list[str]:
    """Report lines for a file of any supported kind."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return describe_safetensors(path)
    if suffix in IMAGE_SUFFIXES:
        return describe_image(path)
    raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; give .safetensors, .png, .webp or .jpg files")


def main(argv: list[str] | None = None) -> int:
    """Print each file's report; return 2 if any file could not be read, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help=".safetensors, .png, .webp or .jpg files")
    args = parser.parse_args(argv)
    status = 0
    printed = False
    for path in args.files:
        try:
            lines = describe(path)
        except UserError as e:
            print(f"show_metadata: {e}", file=sys.stderr)
            status = 2
            continue
        if printed:
            print()
        print("\n".join(lines))
        printed = True
    return status


if __name__ == "__main__":
    sys.exit(main())
