"""Bad web-UI dialect input through the command: each bad prompt line skipped with file:line and one
message; a bad run-wide file (--hypernetwork) ends the run with exit status 2 in one line."""

from __future__ import annotations

import pickle

from tests.helpers import pngs, run


def test_bad_lines_are_skipped_with_file_and_line(tiny_models, tmp_path, caplog):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "detail.safetensors").write_bytes(b"")
    styles = tmp_path / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nSharp,sharp,\n")
    lines = tmp_path / "p.txt"
    lines.write_text("\n".join([
        "a good cat --d 1",
        "a <embedding:x> cat",
        "a <lora:detial:1> cat",
        "a [cat:dog:x]",
        "a [cat:dog:-2]",
        "a [cat|dog",
        "a cat --style Shrp",
        "a cat --n [ugly:pretty:1:2]",
    ]) + "\n")
    with caplog.at_level("ERROR"):
        assert run(tiny_models, tmp_path / "out", "--from_file", str(lines), "--lora_dir", str(tmp_path / "loras"),
                   "--styles", str(styles)) == 3  # some lines skipped
    assert len(pngs(tmp_path / "out")) == 1
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [
        f"{lines}:2: skipped: <embedding:x>: unknown tag type 'embedding' (known: <lora:NAME:WEIGHT>, "
        "<lyco:NAME:WEIGHT>, <hypernet:NAME:MULT>)",
        f"{lines}:3: skipped: <lora:detial:1>: no file named 'detial' in {tmp_path / 'loras'}; close names: detail",
        f"{lines}:4: skipped: [cat:dog:x]: 'x' is not a number (prompt editing is [from:to:when], when a step or "
        "a fraction of the steps)",
        f"{lines}:5: skipped: [cat:dog:-2]: when -2 is below 0 (a step, or a fraction of the steps below 1)",
        f"{lines}:6: skipped: '[' at character 3 of the prompt is never closed (prompt editing is [from:to:when], "
        "alternation [a|b])",
        f"{lines}:7: skipped: --style Shrp: no such style in {styles} (styles: Sharp)",
        f"{lines}:8: skipped: [ugly:pretty:1:2]: too many ':' (prompt editing is [from:to:when])",
    ]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_hypernetwork_pickle_with_code_ends_the_run(tiny_models, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({768: _Payload()}, protocol=2))
    assert run(tiny_models, tmp_path / "out", "--prompt", "a cat", "--hypernetwork", str(evil)) == 2
    captured = capsys.readouterr()
    assert "must never run" not in captured.out
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [f"gen_img.py: error: hypernetwork {evil}: the file needs code to load and was refused (only "
                      "tensors and plain values are read from hypernetwork files)"]
    assert not pngs(tmp_path / "out") if (tmp_path / "out").exists() else True
