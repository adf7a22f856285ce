"""One run split over processes: data parallelism under `torchrun` or `accelerate launch`.

Both launchers start one worker process per device and describe its place in environment
variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). With more than
one process, `join` connects this one to the others with `torch.distributed`: a TCP store
(torchrun's own when it has one) and a gloo process group on top of it.

How the work is split, so that every image gets the pixels and the name one process would
give it: every process reads the same prompt lines, makes the same Jobs (with the same
seeds: the run's random seed and timestamp are rank 0's, broadcast at the start), numbers
them, groups them into the same batches, and generates batch number k when
`k % world_size == rank` (`Team.owns`). Only the shares differ; the files are the same.

What the processes tell each other through the store while they run: the images done
(rank 0 shows one bar for the whole run), the first failure (a rank that fails publishes
its one-line error; the others stop before their next batch and exit quietly with the same
status), and the end of each `--n_iter` round (a barrier rank 0 waits at with its bar).
The summary of every rank is gathered at the end and rank 0 prints it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from library.errors import UserError

if TYPE_CHECKING:
    from library.records.options import Options

logger = logging.getLogger(__name__)

#: Seconds a process waits to reach the others (rendezvous) before it gives up; `SDGEN_DIST_TIMEOUT`.
CONNECT_SECONDS = 600.0
#: Seconds between two looks at the store while waiting at a barrier.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Placement:
    """This process's place as the launcher describes it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def placement() -> Placement:
    """`RANK` / `WORLD_SIZE` / `LOCAL_RANK` from the environment (one process without them)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start the run with torchrun or "
                        "accelerate launch, or unset them") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {size}; start the run with torchrun or "
                        "accelerate launch, or unset them")
    return Placement(rank, size, local_rank)


def speaks_for_the_run() -> bool:
    """False on ranks other than 0: errors every rank finds alike (the same arguments) are
    printed once, by rank 0. Reads only the environment: usable before anything is imported."""
    try:
        return placement().rank == 0
    except UserError:
        return True


class NotConnected(UserError):
    """This rank could not reach the others: its own problem, which it prints itself."""


class PeerFailed(UserError):
    """Another rank failed (or the launcher stopped this one); this rank exits with `status`
    and no message of its own: the failing rank printed it."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = status


class Team:
    """This process's share of the run and what it tells the other processes."""

    def __init__(self, place: Placement = Placement(), store: Any = None, seed: int | None = None,
                 timestamp: str | None = None) -> None:
        self.place = place
        self._store = store
        self.seed = seed  # the run's random seed when --seed is not given (None: draw one's own)
        self.timestamp = timestamp  # rank 0's start time for default file names (None: now)
        self._round = 0
        self._previous_sigterm = None

    @property
    def size(self) -> int:
        return self.place.size

    @property
    def rank(self) -> int:
        return self.place.rank

    @property
    def leads(self) -> bool:
        """True on rank 0: it shows progress, prints the summary and the warnings."""
        return self.place.rank == 0

    def owns(self, batch_number: int) -> bool:
        """Whether this process generates the run's `batch_number`-th batch (0-based)."""
        return batch_number % self.place.size == self.place.rank

    def shuffler(self) -> random.Random | Any:
        """What `--shuffle_prompts` shuffles with: the same order on every rank."""
        return random.Random(self.seed) if self.size > 1 else random

    # ------------------------------------------------------------------ while running

    def done(self, count: int, bar) -> None:
        """`count` more images of this round are finished (or already there); rank 0's `bar`
        shows the whole run's count."""
        if self._store is None:
            bar.update(count)
            return
        total = self._counter("images", count)
        if self.leads:
            _advance(bar, total)

    def check(self) -> None:
        """Raise `PeerFailed` if another rank has failed (called before each batch)."""
        if self._store is None:
            return
        try:
            failed = self._store.check(["failed"])
        except RuntimeError:  # rank 0's store is gone: the run was stopped
            raise PeerFailed("rank 0 stopped") from None
        if failed:
            raise PeerFailed("another rank failed", self.failure_status())

    def end_round(self, bar) -> None:
        """Wait until every rank finished this round; rank 0 keeps its bar moving."""
        if self._store is None:
            return
        self._counter("finished", 1)
        while self._counter("finished") < self.size:
            self.check()
            if self.leads:
                _advance(bar, self._counter("images"))
            time.sleep(POLL_SECONDS)
        if self.leads:
            _advance(bar, self._counter("images"))
        self._round += 1

    def fail(self, status: int) -> bool:
        """Publish this rank's failure; True when it is the run's first (this rank prints it)."""
        if self._store is None:
            return True
        payload = json.dumps({"rank": self.rank, "status": status})
        try:
            first = self._store.compare_set("failed", "", payload)
        except RuntimeError:
            return True
        return first.decode() == payload if isinstance(first, bytes) else first == payload

    def failure_status(self) -> int:
        """The exit status of the run's first failure (2 when unknown)."""
        try:
            return int(json.loads(self._store.get("failed"))["status"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError):
            return 2

    def gather(self, summary: dict) -> list[dict]:
        """Every rank's `summary` (a JSON-able dict), in rank order, on every rank."""
        if self._store is None:
            return [summary]
        import torch.distributed as dist

        summaries: list = [None] * self.size
        dist.all_gather_object(summaries, summary)
        return summaries

    def close(self) -> None:
        """Leave the process group (at the end of a run, or when it failed)."""
        if self._store is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def stop_on_sigterm(self) -> None:
        """When the launcher stops this rank (torchrun does when another one fails), end like an
        error: files being written are removed, and this rank prints nothing."""
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, frame):
            raise PeerFailed("stopped by the launcher", 128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, stop)

    def _counter(self, name: str, add: int = 0) -> int:
        """This round's counter `name` after adding `add`; `PeerFailed` when rank 0's store is gone."""
        try:
            return self._store.add(f"round{self._round}/{name}", add)
        except RuntimeError:
            raise PeerFailed("rank 0 stopped") from None


SOLO = Team()


def _advance(bar, done: int) -> None:
    """Move `bar` (tqdm or `library.progress.LineProgress`) to `done`, if that is further."""
    if done > bar.n:
        bar.update(done - bar.n)


def join(options: Options) -> Team:
    """This process's `Team`: `SOLO` for a plain run, else connected to the other ranks."""
    from library.images import output_files

    place = placement()
    if place.size == 1:
        return Team(timestamp=output_files.timestamp_now())
    rounds = options.rounds
    if rounds.interactive or rounds.from_module is not None:
        source = "--interactive" if rounds.interactive else "--from_module"
        raise UserError(f"{source} cannot be split over {place.size} processes (each would read its own "
                        "prompts); run it in one process, without torchrun")
    store = _connect(place)
    start = _shared_start(place, store)
    logger.debug("rank %d of %d joined (local rank %d)", place.rank, place.size, place.local_rank)
    team = Team(place, store, seed=start["seed"], timestamp=start["timestamp"])
    team.stop_on_sigterm()
    if not team.leads:
        logging.getLogger().setLevel(logging.ERROR)  # rank 0 speaks for the run; the others only of errors
    return team


def _connect(place: Placement):
    """The run's key-value store and gloo process group (torchrun's agent store when it has one)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run one process per device by hand")
    host = os.environ.get("MASTER_ADDR", "localhost")
    try:
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise UserError(f"MASTER_PORT {os.environ['MASTER_PORT']!r} is not a port number") from None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(seconds=_connect_seconds())
    try:
        base = dist.TCPStore(host, port, place.size, is_master=place.rank == 0 and not agent_store,
                             timeout=timeout, wait_for_workers=False)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"gen_img/{restart}/", base)
        dist.init_process_group("gloo", store=dist.PrefixStore("group/", store), rank=place.rank,
                                world_size=place.size, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        from library.errors import first_line

        raise NotConnected(f"rank {place.rank}: could not reach the other processes at {host}:{port} "
                        f"({first_line(exc, 120)}); check MASTER_ADDR/MASTER_PORT and that every rank "
                        "was started") from None
    return store


def _connect_seconds() -> float:
    text = os.environ.get("SDGEN_DIST_TIMEOUT", str(CONNECT_SECONDS))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:
        raise UserError(f"SDGEN_DIST_TIMEOUT {text!r}: give the seconds to wait for the other processes, e.g. 600")
    return seconds


def _shared_start(place: Placement, store) -> dict:
    """Rank 0's start time (default file names) and random seed (runs without --seed), on every rank."""
    import torch.distributed as dist

    from library.images import output_files

    start = [{"timestamp": output_files.timestamp_now(), "seed": random.SystemRandom().randrange(2**63)}]
    dist.broadcast_object_list(start, src=0)
    return start[0]
