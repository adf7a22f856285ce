"""`--xyz` and `--prompt_matrix` runs: every image with its own settings, grids whose cells are those images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import gen_img
from tests.helpers import meta, pngs, run


def test_two_axes_of_three_values_make_nine_images_and_one_grid(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_models, out, "--prompt", "a cat --n dog", "--seed", "3", "--batch_size", "3",
               "--xyz", "cfg: 5, 7, 9", "steps: 1-3") == 0
    images = [p for p in pngs(out) if p.name.startswith("im_")]
    (grid_file,) = [p for p in pngs(out) if p.name.startswith("xyz_grid_")]
    assert len(images) == 9
    settings = [(meta(p)["steps"], meta(p)["scale"], meta(p)["seed"]) for p in images]
    assert settings == [(s, c, "3") for s in ("1", "2", "3") for c in ("5.0", "7.0", "9.0")]
    grid = Image.open(grid_file)
    description = json.loads(grid.text["grid"])
    assert description["columns"] == ["cfg: 5", "cfg: 7", "cfg: 9"]
    assert description["rows"] == ["steps: 1", "steps: 2", "steps: 3"]
    pixels = np.asarray(grid.convert("RGB"))
    assert [(c["row"], c["column"], c["file"]) for c in description["cells"]] == [
        (r, c, images[3 * r + c].name) for r in range(3) for c in range(3)]
    for cell in description["cells"]:
        x0, y0, x1, y1 = cell["box"]
        assert np.array_equal(pixels[y0:y1, x0:x1], np.asarray(Image.open(out / cell["file"]).convert("RGB")))


def test_prompt_matrix_with_a_prompt_file(tiny_models, tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("a house | red --d 4\na tree | tall\n")
    assert run(tiny_models, tmp_path / "out", "--from_file", str(lines), "--prompt_matrix") == 0
    images = [p for p in pngs(tmp_path / "out") if p.name.startswith("im_")]
    assert [meta(p)["prompt"] for p in images] == ["a house", "a house, red", "a tree", "a tree, tall"]
    assert meta(images[0])["seed"] == meta(images[1])["seed"] == "4"
    assert meta(images[2])["seed"] == meta(images[3])["seed"]
    assert len([p for p in pngs(tmp_path / "out") if p.name.startswith("xyz_grid_")]) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--prompt", "a cat", "--xyz", "prompt s/r: dog, fox"],
     '--xyz "prompt s/r: ...": "dog" is not in the prompt "a cat" nor in its negative prompt; Prompt S/R '
     "replaces its first value"),
    (["--prompt", "a cat", "--xyz", "flavour: 1, 2"], '--xyz "flavour: 1, 2": unknown axis "flavour"'),
    (["--prompt", "a cat", "--xyz", "steps: 1-100", "seed: 1-100"],
     "--xyz: 100 x 100 = 10000 cells per prompt line; at most 1000"),
    (["--prompt", "a cat", "--prompt_matrix"], '--prompt_matrix: the prompt "a cat" has no "|" parts to combine'),
])
def test_bad_sweeps_are_one_line_before_the_model_loads(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        gen_img.main(["--ckpt", str(tmp_path / "no-such-model.safetensors"), "--outdir", str(tmp_path / "o"),
                      *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gen_img.py: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


class _Team:
    """The part of a split run's team that `collect` uses: two processes' lists."""

    def __init__(self, leads: bool, other: list) -> None:
        self.size, self.leads, self.other = 2, leads, other

    def gather(self, summary: dict) -> list[dict]:
        return [summary, {"saved": self.other}]


def test_the_first_process_of_a_split_run_gets_every_process_images_in_job_order():
    from library.run.sweep_run import collect

    mine, theirs = [("a --s 1", 0, "a.png"), ("a --s 3", 2, "c.png")], [["a --s 2", 1, "b.png"]]
    assert collect(_Team(True, theirs), mine) == [("a --s 1", 0, "a.png"), ("a --s 2", 1, "b.png"),
                                                  ("a --s 3", 2, "c.png")]
    assert collect(_Team(False, theirs), mine) is None


def test_hfs_without_highres_fix_is_a_warning(tiny_models, tmp_path, caplog):
    assert run(tiny_models, tmp_path / "out", "--prompt", "a cat --d 1 --hfs 0.5") == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--hfs" in r.getMessage()] == [
        "--prompt: --hfs ignored: it changes the Highres fix scale (give --highres_fix_scale)"]
    assert '"hfs"' not in meta(pngs(tmp_path / "out")[0])["job-options"]
