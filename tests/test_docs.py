"""Documentation that must match the code."""

from tests.helpers import ROOT


def test_options_doc_is_generated_from_the_current_parser():
    from tools.make_options_doc import main

    assert main(["--check"]) == 0, "run: python tools/make_options_doc.py"


def test_readme_starts_with_the_two_quick_start_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "gen_img.py" in block[0] and "pytest" in block[1]
    assert block[1] in (ROOT / ".ci" / "run").read_text()
