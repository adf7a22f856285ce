"""Labelled grid images of a sweep (`--xyz`, `--prompt_matrix`): cells pasted pixel for pixel.

A grid is a title line, a row of column labels above the cells and a column of row labels
left of them (none for a single unnamed row), on white; each cell is its image pasted
unchanged at its top-left corner of a cell as large as the largest image (a missing image, of
a skipped line, leaves its cell grey). The grid PNG carries a `grid` text item: JSON with the
labels and, per cell, its box and file name (`library.run.sweep_run` saves it), so a script
can find every image in it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAD = 6
FONT_SIZE = 14


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (words never split)."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines or [""]


def make_grid(title: str, columns: list[str], rows: list[str],
              cells: list[list[Path | None]]) -> tuple[Image.Image, dict]:
    """The grid image of `cells[row][column]` (image files) and its `grid` description."""
    images = [[Image.open(p).convert("RGB") if p is not None else None for p in row] for row in cells]
    shown = [im for row in images for im in row if im is not None]
    cell_w = max((im.width for im in shown), default=64)
    cell_h = max((im.height for im in shown), default=64)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(sum(font.getmetrics())) + 2
    labelled_rows = rows != [""]
    left = (max(int(probe.textlength(r, font=font)) for r in rows) + 2 * PAD) if labelled_rows else 0
    left = min(left, 2 * cell_w) if labelled_rows else 0
    width = left + cell_w * len(columns)
    title_lines = _wrap(probe, title, font, width - 2 * PAD)
    column_lines = [_wrap(probe, c, font, cell_w - 2 * PAD) for c in columns]
    top = PAD + line_h * len(title_lines) + PAD + line_h * max(len(c) for c in column_lines) + PAD
    grid = Image.new("RGB", (width, top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), text, fill="black", font=font)
    label_top = PAD + line_h * len(title_lines) + PAD
    for c, lines in enumerate(column_lines):
        for i, text in enumerate(lines):
            x = left + c * cell_w + (cell_w - draw.textlength(text, font=font)) / 2
            draw.text((x, label_top + i * line_h), text, fill="black", font=font)
    boxes = []
    for r, row in enumerate(images):
        if labelled_rows:
            for i, text in enumerate(_wrap(draw, rows[r], font, left - 2 * PAD)):
                draw.text((PAD, top + r * cell_h + cell_h / 2 - line_h / 2 + i * line_h), text, fill="black",
                          font=font)
        for c, image in enumerate(row):
            x, y = left + c * cell_w, top + r * cell_h
            if image is None:
                draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill="gray")
                continue
            grid.paste(image, (x, y))
            boxes.append({"column": c, "row": r, "box": [x, y, x + image.width, y + image.height],
                          "file": cells[r][c].name})
    return grid, {"title": title, "columns": columns, "rows": rows, "cells": boxes}

