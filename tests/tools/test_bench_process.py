"""The `process` benchmark on the tiny model: one real gen_img.py process, its figures parsed."""

from __future__ import annotations

import json
from pathlib import Path

from library.run.summary import Summary, summary_line
from tools.bench import process
from tools.bench.__main__ import main


def test_the_summary_pattern_reads_one_and_several_images() -> None:
    for count, shares in ((1, ()), (3, ()), (3, (2, 1))):
        summary = Summary([Path(f"{n}.png") for n in range(count)], seconds=27.34, steps=8, shares=shares)
        found = process.SUMMARY.search(summary_line(summary))
        assert found is not None and (int(found.group(1)), float(found.group(2))) == (count, 27.3)


def test_one_process_run_gives_every_figure(tiny_models, tmp_path) -> None:
    out = tmp_path / "process.json"
    argv = ["process", "--ckpt", str(tiny_models["sd1"]), "--size", "64", "--steps", "2", "--runs", "1", "--json", str(out)]
    assert main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert 0 <= run["generating_s"] < run["whole_s"]  # the summary rounds to 0.1 s: 0.0 for the tiny model
    assert run["overhead_s"] == run["whole_s"] - run["generating_s"]
    assert 0 < run["first_image_s"] <= run["whole_s"]
    assert 0.2 < run["peak_rss_gb"] < 4  # torch alone is ~0.3 GB; the tiny model adds little
