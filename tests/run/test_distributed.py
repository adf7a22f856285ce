"""Data-parallel runs (`library.run.distributed`): several processes make exactly one process's files.

The multi-process tests start real `torchrun` runs (gloo on localhost) of the tiny model,
each worker single-threaded, and compare them with a single-process run with one thread.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gen_img
from library.images import output_files
from library.run import distributed
from library.run.distributed import Placement, Team
from library.run.summary import Summary, combined, exit_status
from tests.helpers import ROOT, pngs, run

PROMPTS = "a red cat --d 5\nblue sky\ngreen hill --s 4\nold tree\nwhite house --n dark\n"
TIMEOUT = 180


def _gen_args(tiny_models, outdir: Path, prompt_file: Path, *extra: str) -> list[str]:
    """5 lines x 2 images in batches of 2 (one line with 4 steps: 5 batches); 40 steps are long
    enough to stop a run in the middle."""
    return ["--ckpt", str(tiny_models["sd1"]), "--outdir", str(outdir), "--from_file", str(prompt_file),
            "--images_per_prompt", "2", "--seed", "7", "--W", "64", "--H", "64", "--batch_size", "2",
            "--steps", "40", *extra]


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), **more)
    return env


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "gen_img.py", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def _torchrun(args: list[str], processes: int = 2, **popen) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "gen_img.py", *args]


def _untimed(path: Path) -> str:
    """A default file name without its timestamp (two runs have two timestamps)."""
    return re.sub(r"^im_\d{14}_", "im_*_", path.name)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.info["parameters"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "five.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def single_run(tiny_models, prompt_file, tmp_path_factory) -> Path:
    """The files of one process, one thread: what every split or resumed run must equal."""
    outdir = tmp_path_factory.mktemp("single")
    done = _one_process(_gen_args(tiny_models, outdir, prompt_file))
    assert done.returncode == 0, done.stderr
    assert len(pngs(outdir)) == 10
    return outdir


def test_two_processes_write_the_files_of_one(tiny_models, prompt_file, single_run, tmp_path):
    outdir = tmp_path / "two"
    done = subprocess.run(_torchrun(_gen_args(tiny_models, outdir, prompt_file)), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    # 5 lines x 2 images in batches of 2, one line with other steps: 5 batches, 3 for rank 0, 2 for rank 1
    assert done.stdout.strip().splitlines()[-1].startswith("10 images written by 2 processes (6 + 4) in ")
    ours, theirs = pngs(outdir), pngs(single_run)
    assert [_untimed(p) for p in ours] == [_untimed(p) for p in theirs]
    assert len({p.name[:17] for p in ours}) == 1  # one timestamp: rank 0's, broadcast
    for mine, reference in zip(ours, theirs):
        assert np.array_equal(_pixels(mine), _pixels(reference)), mine.name
        assert _parameters(mine) == _parameters(reference)
    assert "Traceback" not in done.stderr
    # rank 1 logs nothing but errors: the model is announced once; rank 0 counts every rank's images
    assert done.stderr.count("model tiny-sd1.safetensors: SD 1.x") == 1
    counts = [int(n) for n in re.findall(r"library.progress: images (\d+)/10,", done.stderr)]
    assert counts == sorted(set(counts)) and counts[-1] == 10
    assert "library.progress: steps" not in done.stderr


def test_kill_then_resume_gives_the_uninterrupted_files(tiny_models, prompt_file, single_run, tmp_path):
    """A split run killed (SIGKILL, all its processes) after its first images, resumed in one
    process with --skip_existing (which has a new timestamp for the default names), leaves
    the files of an uninterrupted run."""
    outdir = tmp_path / "resumed"
    run = subprocess.Popen(_torchrun(_gen_args(tiny_models, outdir, prompt_file)), cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not (outdir.is_dir() and pngs(outdir)) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_tree(run.pid)
    run.wait(timeout=30)
    before = len(pngs(outdir))
    assert 1 <= before < 10, f"the run was not killed in the middle ({before} files)"

    done = _one_process(_gen_args(tiny_models, outdir, prompt_file, "--skip_existing"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{10 - before} image{'s' if before != 9 else ''} written in ")
    assert done.stdout.rstrip().endswith(f"; {before} image{'s' if before > 1 else ''} already there "
                                         "(--skip_existing)")
    resumed = sorted(pngs(outdir), key=_untimed)  # two timestamps now: the killed run's and the resumed one's
    assert [_untimed(p) for p in resumed] == [_untimed(p) for p in pngs(single_run)]
    for mine, theirs in zip(resumed, pngs(single_run)):
        assert np.array_equal(_pixels(mine), _pixels(theirs)), mine.name
    assert not list(outdir.glob(".*.part"))  # what the killed run was writing is cleared away


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it (torchrun's workers have sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for member in tree[1:]:  # not our children: wait until they are gone
        while Path(f"/proc/{member}").exists() and "Z" not in _state(member):
            time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_failing_rank_fails_the_run_in_one_line(tiny_models, prompt_file, tmp_path):
    """Two ranks started by hand (as on two machines): rank 1's checkpoint is missing there."""
    port = str(_free_port())
    missing = tmp_path / "not-here.safetensors"
    ranks = []
    for rank, ckpt in ((0, str(tiny_models["sd1"])), (1, str(missing))):
        args = _gen_args(tiny_models, tmp_path / "out", prompt_file, "--steps", "3")
        args[1] = ckpt
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT=port)
        ranks.append(subprocess.Popen([sys.executable, "gen_img.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [rank.communicate(timeout=TIMEOUT) for rank in ranks]  # a hang fails here
    (out0, err0), (out1, err1) = outputs
    assert ranks[1].returncode == 2
    assert ranks[0].returncode == 2
    errors = [line for line in (err0 + err1).splitlines() if "error" in line.lower()]
    assert errors == [f"gen_img.py: error: rank 1: --ckpt {missing}: no such file or folder"]
    assert "Traceback" not in err0 + err1
    assert out0 == out1 == ""  # no summary: the run failed


def test_interactive_and_from_module_refuse_several_processes(monkeypatch, tiny_models, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        for source in (["--interactive"], ["--from_module", str(tmp_path / "prompter.py")]):
            code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), *source])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2
            assert len(err) == expected  # rank 0 says it once for the run
            if expected:
                assert err[0] == (f"gen_img.py: error: {source[0]} cannot be split over 2 processes (each would "
                                  "read its own prompts); run it in one process, without torchrun")
    assert not (tmp_path / "out").exists()


def test_argument_errors_are_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            gen_img.main(["--steps", "x", "--prompt", "p"])
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == lines


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2 does not fit WORLD_SIZE 2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE, RANK and LOCAL_RANK must be integers"),
])
def test_a_malformed_launch_environment_is_one_line(monkeypatch, tiny_models, tmp_path, capsys, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path), "--prompt", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


# ----------------------------------------------------------------------------- the parts


def test_batches_are_dealt_round_robin():
    teams = [Team(Placement(rank, 3, rank)) for rank in range(3)]
    owners = [[team.owns(n) for team in teams].index(True) for n in range(7)]
    assert owners == [0, 1, 2, 0, 1, 2, 0]
    assert all(sum(team.owns(n) for team in teams) == 1 for n in range(7))


def test_name_plan_matches_saving_one_after_the_other(tmp_path):
    plan = output_files.NamePlan()
    names = [plan.claim(n) for n in ("same", "same", "other.png", "same", "same_1", "x.webp", "x.webp")]
    assert names == ["same", "same_1", "other.png", "same_2", "same_1_1", "x.webp", "x_1.webp"]
    saved = [output_files.save_image(Image.new("RGB", (2, 2)), tmp_path, n, {}).name
             for n in ("same", "same", "other.png", "same", "same_1", "x.webp", "x.webp")]
    assert saved == names


def test_existing_images_match_default_names_whatever_their_timestamp(tmp_path):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")  # a complete image: an unreadable one counts as missing
    for name in ("im_20261201101010_003_42.png", "im_000007.png", "mine.png", ".hidden.png.abc.part"):
        (tmp_path / name).write_bytes(png.getvalue())
    there = output_files.ExistingImages(tmp_path)
    assert "im_20270101000000_003_42.png" in there
    assert "im_20270101000000_003_43.png" not in there
    assert "im_20270101000000_1003_42.png" not in there
    assert "im_000007.png" in there and "im_000008.png" not in there
    assert "mine.png" in there and "mine_1.png" not in there
    assert "im_1003_42.png" not in there


def test_stale_part_files_of_a_name_are_removed(tmp_path):
    (tmp_path / ".im_000003.png.0123456789ab.part").write_bytes(b"x")
    (tmp_path / ".im_20261201101010_002_9.png.aa.part").write_bytes(b"x")
    (tmp_path / ".im_000004.png.0123456789ab.part").write_bytes(b"x")
    there = output_files.ExistingImages(tmp_path)
    there.remove_stale_parts("im_000003.png")
    there.remove_stale_parts("im_20270101000000_002_9.png")
    assert [p.name for p in tmp_path.iterdir()] == [".im_000004.png.0123456789ab.part"]


def test_summaries_of_all_ranks_add_up():
    parts = [
        Summary([Path("a.png"), Path("b.png")], 1, 3.0, 20, "f:1: bad", 1).to_dict(),
        Summary([Path("c.png")], 1, 4.5, 10, "f:1: bad", 0).to_dict(),
    ]
    whole = combined(parts)
    assert [p.name for p in whole.written] == ["a.png", "b.png", "c.png"]
    assert (whole.skipped_lines, whole.seconds, whole.steps, whole.existing, whole.shares) == (1, 4.5, 30, 1, (2, 1))
    assert whole.line() == ("3 images written by 2 processes (2 + 1) in 4.5 s, 0.15 s/it; 1 image already there "
                            "(--skip_existing); 1 prompt line skipped (first: f:1: bad)")
    assert exit_status(Summary([], 1, existing=2)) == 3 and exit_status(Summary([], 1)) == 1
    assert exit_status(Summary([], 0, existing=2)) == 0


def test_a_solo_team_counts_on_its_own_bar():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    distributed.SOLO.done(3, bar)
    distributed.SOLO.end_round(bar)
    distributed.SOLO.check()
    assert bar.n == 3
    assert distributed.SOLO.fail(2) is True
    assert distributed.SOLO.gather({"a": 1}) == [{"a": 1}]


# ----------------------------------------------------------------------------- --skip_existing, one process


def test_skip_existing_makes_only_the_missing_images(tiny_models, tmp_path, capsys):
    """Highres fix with the 1st stage saved: a deleted final image is made again (its batch,
    the same pixels), its 1st-stage file is not written twice, the others are not made."""
    out = tmp_path / "out"
    highres = ("--W", "128", "--H", "96", "--highres_fix_scale", "0.5", "--highres_fix_steps", "4")
    args = (*highres, "--prompt", "a tower", "--images_per_prompt", "3", "--seed", "3",
            "--sequential_file_name", "--highres_fix_save_1st")
    assert run(tiny_models, out, *args) == 0
    first = {p.name: p.read_bytes() for p in pngs(out)}
    assert sorted(first) == ["im_0000001.png", "im_0000002.png", "im_0000003.png",
                             "im_1000001.png", "im_1000002.png", "im_1000003.png"]
    (out / "im_1000002.png").unlink()
    capsys.readouterr()
    assert run(tiny_models, out, *args, "--skip_existing") == 0
    assert capsys.readouterr().out.startswith("1 image written in ")
    assert {p.name: p.read_bytes() for p in pngs(out)} == first

    assert run(tiny_models, out, *args, "--skip_existing") == 0
    assert capsys.readouterr().out.strip() == "0 images written in 0.0 s; 3 images already there (--skip_existing)"
    assert len(pngs(out)) == 6


def test_skip_existing_with_repeated_f_names(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--prompt", "a cat --f same", "--images_per_prompt", "2", "--seed", "4")
    assert run(tiny_models, out, *args) == 0
    assert [p.name for p in pngs(out)] == ["same.png", "same_1.png"]
    (out / "same_1.png").unlink()
    capsys.readouterr()
    assert run(tiny_models, out, *args, "--skip_existing") == 0
    assert capsys.readouterr().out.startswith("1 image written in ")
    assert [p.name for p in pngs(out)] == ["same.png", "same_1.png"]  # not same_2.png
    assert run(tiny_models, out, *args) == 0  # without it nothing is overwritten
    assert [p.name for p in pngs(out)] == ["same.png", "same_1.png", "same_2.png", "same_3.png"]


def test_each_local_rank_takes_its_own_gpu():
    from library.run.build import device_name

    assert [device_name(None, True, rank) for rank in range(3)] == ["cuda", "cuda:1", "cuda:2"]
    assert device_name("cuda", True, 2) == "cuda:2"
    assert device_name("cuda:0", True, 2) == "cuda:0"  # an explicit index is taken as given
    assert device_name(None, False, 2) == "cpu"


def test_without_seed_every_rank_draws_the_same_seeds_and_order():
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Line, shuffled

    shared = 123456789
    sources = [SeedSource(None, False, unseeded=shared) for _rank in range(2)]
    draws = [[source.draw() for _ in range(4)] for source in sources]
    assert draws[0] == draws[1] and len(set(draws[0])) == 4
    assert SeedSource(None, False).draw() != SeedSource(None, False).draw()  # one process: fresh entropy
    lines = [Line(str(n), f"f:{n}") for n in range(8)]
    teams = [Team(Placement(rank, 2, rank), seed=shared) for rank in range(2)]
    orders = [[line.text for line in shuffled(lines, True, team.shuffler())] for team in teams]
    assert orders[0] == orders[1] != [str(n) for n in range(8)]


def test_a_rank_that_cannot_reach_the_others_says_so(monkeypatch, tiny_models, tmp_path, capsys):
    port = _free_port()  # nothing listens there
    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="localhost",
                           MASTER_PORT=str(port), SDGEN_DIST_TIMEOUT="2").items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    code = gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), "--prompt", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.monotonic() - start < 30
    assert len(err) == 1 and err[0].startswith(
        f"gen_img.py: error: rank 1: could not reach the other processes at localhost:{port} ("), err
    assert err[0].endswith("); check MASTER_ADDR/MASTER_PORT and that every rank was started")
    monkeypatch.setenv("SDGEN_DIST_TIMEOUT", "soon")
    monkeypatch.setenv("RANK", "0")
    assert gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path / "out"), "--prompt", "p"]) == 2
    assert capsys.readouterr().err.strip() == ("gen_img.py: error: SDGEN_DIST_TIMEOUT 'soon': give the seconds to "
                                               "wait for the other processes, e.g. 600")
