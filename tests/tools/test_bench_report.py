"""The `report` benchmark: sides alternate run by run; the tables show every figure."""

from __future__ import annotations

from pathlib import Path

from tools.bench import report as report_tool


def _figures(overhead: float, peak: float) -> dict[str, float]:
    return {"whole_s": 10 + overhead, "generating_s": 10.0, "overhead_s": overhead, "first_image_s": 9.9 + overhead,
            "peak_rss_gb": peak}


def test_process_runs_alternate_the_sides(monkeypatch) -> None:
    order = []

    def one_run(ckpt, options, extra):
        order.append((options.gen_img.parent.name, options.dtype, options.size, options.steps))
        return _figures(1.0, 2.0)

    monkeypatch.setattr(report_tool.process, "one_run", one_run)
    sides = {"before": Path("/old/gen_img.py"), "after": Path("/new/gen_img.py")}
    result = report_tool.process_runs(Path("model.safetensors"), sides, "bf16", 256, 8, 3)
    assert [side for side, *_ in order] == ["old", "new", "new", "old", "old", "new"]
    assert set(order[0][1:]) == {"bf16", 256, 8}
    assert {side: len(runs) for side, runs in result.items()} == {"before": 3, "after": 3}


def test_the_tables_show_medians_and_ranges() -> None:
    runs = {"before": [_figures(6.0, 6.7), _figures(7.0, 6.71)], "after": [_figures(4.0, 4.95), _figures(5.0, 4.96)]}
    report = {"processes": {"fp32": runs, "bf16": runs}, "peaks_512": {"fp32": runs, "bf16": runs},
              "import_floor_s": [3.5, 3.7, 3.6],
              "unet": {"bf16 512x512, blocked attention": {"calls_s": {"ours": [3.0, 3.1], "diffusers": [3.8, 3.9]},
                                                           "ratio_median": 0.78, "ratio_min": 0.79}}}
    table = report_tool.process_table(report).splitlines()
    assert table[0] == "| figure | before | after |"
    assert table[2] == "| fp32 256x256, overhead (whole - generating) | 6.50 s (6.00-7.00) | 4.50 s (4.00-5.00) |"
    assert "| fp32 256x256, peak RSS | 6.705 GB (6.700-6.710) | 4.955 GB (4.950-4.960) |" in table
    assert table[-1] == "| libraries' import floor (bare process) | 3.60 s (3.50-3.70) | |"
    assert len(table) == 2 + 2 * 4 + 2 + 1
    assert report_tool.unet_table(report).splitlines()[-1] == (
        "| bf16 512x512, blocked attention | 3.050 s (3.000-3.100) | 3.850 s (3.800-3.900) | 0.780; 0.790 |")


def test_the_entry_hands_report_its_options(monkeypatch) -> None:
    """`python -m tools.bench report ...` parses the report's options and runs it."""
    from tools.bench.__main__ import main

    seen = []
    monkeypatch.setattr(report_tool, "command", lambda args: seen.append(args) or 0)
    assert main(["report", "--before", "/old", "--runs", "1"]) == 0
    (args,) = seen
    assert (args.command, args.before, args.runs, args.calls, args.ckpt) == ("report", "/old", 1, 3, None)
