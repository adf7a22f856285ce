"""Styles (`--styles styles.csv`, prompt option `--style`): the web UI's rules, exact texts and errors."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library.prompts.seeds import SeedSource
from library.prompts.sources import Defaults, Line, jobs_for_line
from library.prompts.styles import Style, apply_styles, merge, read_styles
from tests.helpers import run

CSV = '''name,prompt,negative_prompt
Cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing"
Sharp,"sharp focus, 8k",
Empty,,blurry
'''


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_read_styles(styles_file):
    assert read_styles(str(styles_file)) == {
        "Cinematic": Style("Cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing"),
        "Sharp": Style("Sharp", "sharp focus, 8k", ""),
        "Empty": Style("Empty", "", "blurry"),
    }


def test_merge_wraps_or_appends():
    assert merge("a cat", "photo of {prompt}, dusk") == "photo of a cat, dusk"
    assert merge("a cat", "sharp") == "a cat, sharp"
    assert merge("", "sharp") == "sharp"
    assert merge("a cat", "") == "a cat"


def test_styles_apply_in_order_to_prompt_and_negative(styles_file):
    styles = read_styles(str(styles_file))
    assert apply_styles("Cinematic, Sharp", "a cat", None, styles) == (
        "cinematic still of a cat, film grain, sharp focus, 8k", "cartoon, drawing")
    assert apply_styles("Sharp,Empty", "a cat", "ugly", styles) == ("a cat, sharp focus, 8k", "ugly, blurry")
    assert apply_styles(None, "a cat", None, styles) == ("a cat", None)


def test_a_line_with_style_makes_styled_jobs(styles_file):
    defaults = Defaults(64, 64, 4, 7.5, None, 1, styles=read_styles(str(styles_file)), styles_file=str(styles_file))
    (job,) = jobs_for_line(Line("a {red|red} cat --style Cinematic --n text --d 1", "p.txt:3"), defaults,
                           SeedSource(1, False), None, lambda *texts: 1)
    assert (job.prompt, job.negative_prompt) == ("cinematic still of a red cat, film grain", "text, cartoon, drawing")
    with pytest.raises(UserError) as info:
        list(jobs_for_line(Line("a cat --style Cinema", "p.txt:4"), defaults, SeedSource(1, False), None,
                           lambda *t: 1))
    assert str(info.value) == f"--style Cinema: no such style in {styles_file} (styles: Cinematic, Empty, Sharp)"
    with pytest.raises(UserError) as info:
        list(jobs_for_line(Line("a cat --style Sharp", "p.txt:5"), Defaults(64, 64, 4, 7.5, None, 1),
                           SeedSource(1, False), None, lambda *t: 1))
    assert str(info.value) == "--style Sharp: no styles file; give --styles styles.csv"


@pytest.mark.parametrize(("content", "message"), [
    ("title,text\nx,y\n", "{path}:1: the header has no column name, prompt (expected name,prompt,negative_prompt)"),
    ("name,prompt,negative_prompt\nA,a,b\nB,b,c,d\n", "{path}:3: 4 fields but the header has 3 (quote texts "
                                                       "that contain commas)"),
    ("", "{path}: empty; expected a header line name,prompt,negative_prompt"),
])
def test_malformed_styles_files(tmp_path, content, message):
    path = tmp_path / "styles.csv"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        read_styles(str(path))
    assert str(info.value) == "--styles " + message.format(path=path)


def test_a_malformed_styles_file_ends_the_run_before_the_model_loads(tiny_models, tmp_path, capsys,
                                                                        monkeypatch):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt\nA,a,b\n")
    from library.run import build

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run(tiny_models, tmp_path / "out", "--prompt", "x --style A", "--styles", str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gen_img.py: error: --styles {path}:2: 3 fields but the header has 2 (quote texts that "
                   "contain commas)"]
