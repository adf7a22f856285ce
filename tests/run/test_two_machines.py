"""One prompt file over two "machines" on one box: two network namespaces joined by a veth pair,
one `torchrun --nnodes 2 --nproc_per_node 1` in each, with a c10d rendezvous on the first's
address (docs/scale-out.md gives the same command lines for two real hosts).

Skipped with the reason where network namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, pngs

PROMPTS = "a red cat --d 5\nblue sky\ngreen hill\nold tree\n"
TIMEOUT = 120


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def machines():
    """(namespace, interface, address) of two namespaces joined by a veth pair; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): network namespaces cannot be made here")
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    nodes = [(f"gen{n}{tag}", f"ve{n}{tag}", f"10.77.{int(tag) % 250}.{n + 1}") for n in (0, 1)]
    made = []
    try:
        for name, _, _ in nodes:
            done = _ip("netns", "add", name)
            if done.returncode:
                pytest.skip(f"network namespaces cannot be made here (ip netns add: {done.stderr.strip()})")
            made.append(name)
        assert _ip("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1]).returncode == 0
        for name, interface, address in nodes:
            for args in (("link", "set", interface, "netns", name),
                         ("-n", name, "addr", "add", f"{address}/24", "dev", interface),
                         ("-n", name, "link", "set", interface, "up"), ("-n", name, "link", "set", "lo", "up")):
                done = _ip(*args)
                assert done.returncode == 0, done.stderr
        yield nodes
    finally:
        for name in made:
            for pid in _ip("netns", "pids", name).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", name)


def _env(interface: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME=interface, HF_HUB_OFFLINE="1")
    return env


def _node(nodes, rank: int, args: list[str], run_id: str) -> subprocess.Popen:
    """torchrun on machine `rank`: the rendezvous on machine 0's address; each machine names its own
    address (`--local_addr`), as a host whose name resolves elsewhere must."""
    name, interface, address = nodes[rank]
    command = ["ip", "netns", "exec", name, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes[0][2]}:29400",
               "--rdzv_id", run_id, "--rdzv_conf", f"is_host={int(rank == 0)}", "--local_addr", address,
               "gen_img.py", *args]
    return subprocess.Popen(command, cwd=ROOT, env=_env(interface), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _args(tiny_models, outdir: Path, prompts: Path, steps: int, *extra: str) -> list[str]:
    return ["--ckpt", str(tiny_models["sd1"]), "--outdir", str(outdir), "--from_file", str(prompts), "--seed", "7",
            "--W", "64", "--H", "64", "--steps", str(steps), "--sequential_file_name", "--images_per_prompt", "2",
            *extra]


def _one_process(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "gen_img.py", *args], cwd=ROOT, env=_env("lo"), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def _bytes(outdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in pngs(outdir)}


def test_two_machines_write_the_files_of_one(machines, tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    _one_process(_args(tiny_models, tmp_path / "one", prompts, 4))
    both = [_node(machines, rank, _args(tiny_models, tmp_path / "two", prompts, 4), f"a{os.getpid()}")
            for rank in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT) for node in both]
    assert [node.returncode for node in both] == [0, 0], outputs[0][1][-2000:]
    assert outputs[0][0].strip().splitlines()[-1].startswith("8 images written by 2 processes (4 + 4) in ")
    assert _bytes(tmp_path / "two") == _bytes(tmp_path / "one")  # byte for byte, metadata included
