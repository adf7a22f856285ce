"""One bad prompt line never ends the run: it is skipped with its file and line, the other
lines' images are made, and the exit status (3) and the summary line say how many were skipped."""

from __future__ import annotations

import logging
import re

from tests.helpers import meta, pngs, run

BAD = [
    "bad am --am 1,2,3 --d 2",  # three multipliers, one network
    "bad glr --glr 0.01 --d 3",  # a 64x64 image shrunk to 0 latent pixels
    "bad long name --f " + "x" * 300 + ".png --d 4",
    "bad folder --f sub/x.png --d 5",
    "bad escape --f ../x.png --d 6",
]


def test_each_bad_line_is_skipped_and_the_others_run(tiny_models, tmp_path, capsys, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["good one --d 1", *BAD, "good two --d 7 --am 0.5", "good three --d 8"]) + "\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = run(tiny_models, out, "--from_file", str(prompts), "--steps", "2", "--sampler", "euler_a",
                   "--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"]),
                   "--sequential_file_name")
    assert code == 3
    assert [meta(p)["prompt"] for p in pngs(out)] == ["good one", "good two", "good three"]
    assert [(meta(p)["seed"]) for p in pngs(out)] == ["1", "7", "8"]
    assert not (tmp_path / "x.png").exists() and not (out / "sub").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"{prompts}:2: skipped: --am has 3 values but 1 networks are loaded",
        f"{prompts}:3: skipped: Gradual Latent: a 64x64 image is too small to start at ratio 0.01",
        f"{prompts}:4: skipped: output file name '{'x' * 37}...' is 304 bytes long; --f names are at most 240 bytes",
        f"{prompts}:5: skipped: output file name 'sub/x.png' must be a plain file name; remove folders from --f",
        f"{prompts}:6: skipped: output file name '../x.png' must be a plain file name; remove folders from --f",
    ]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"3 images written in \d+\.\d s, \d+\.\d\d s/it; 5 prompt lines skipped \(first: "
                        + re.escape(f"{prompts}:2: --am has 3 values but 1 networks are loaded)"), last), last


def test_fewer_am_values_than_networks_are_padded_with_the_last(tiny_models, tmp_path):
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Defaults, Line, jobs_for_line

    defaults = Defaults(64, 64, 3, 7.5, None, 1, network_multipliers=(1.0, 1.0, 1.0))
    (job,) = jobs_for_line(Line("a --am 0.5,0.25 --d 1", "p:1"), defaults, SeedSource(None, False), None,
                           lambda *parts: 1)
    assert job.network_multipliers == (0.5, 0.25, 0.25)
