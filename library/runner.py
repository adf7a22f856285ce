"""The run loop: prompt lines -> Jobs -> batches -> images on disk, with progress and summary.

Consecutive images with equal settings share a batch up to `--batch_size`, across prompt
lines (in interactive mode each prompt is finished before the next is read). Each image is
saved as soon as its batch is decoded, atomically and with its metadata.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm.auto import tqdm

from library import images
from library.errors import UserError
from library.jobs import Job, batches
from library.pipeline import Generator
from library.prompts import Defaults, Line, jobs_for_line

logger = logging.getLogger(__name__)


@dataclass
class OutputSettings:
    """Where and how images are written."""

    outdir: Path
    sampler: str
    sequential: bool = False
    model_name: str | None = None
    model_hash: str | None = None
    clip_skip: int | None = None
    vae_batch_size: int = 1
    preview: Callable[[list], None] | None = None


@dataclass
class Summary:
    """What a run did."""

    written: list[Path] = field(default_factory=list)
    skipped_lines: int = 0
    seconds: float = 0.0
    steps: int = 0

    def line(self) -> str:
        rate = f", {self.seconds / self.steps:.2f} s/it" if self.steps else ""
        return f"{len(self.written)} images written in {self.seconds:.1f} s{rate}"


class Runner:
    """Turns prompt lines into saved images with one Generator."""

    def __init__(self, generator: Generator, defaults: Defaults, output: OutputSettings,
                 batch_size: int, before_batch: Callable[[list[Job]], None] | None = None) -> None:
        self.generator = generator
        self.defaults = defaults
        self.output = output
        self.batch_size = batch_size
        self.before_batch = before_batch
        self.summary = Summary()
        self._timestamp = images.timestamp_now()
        self._sequence = 0

    def jobs(self, lines: Iterable[Line], seeds, iter_seed: int | None) -> Iterator[Job]:
        """Jobs of every line; a malformed line is reported (file and line) and skipped."""
        for line in lines:
            try:
                yield from jobs_for_line(line, self.defaults, seeds, iter_seed, self.generator.encoder.chunk_count)
            except UserError as exc:
                logger.error("%s: skipped: %s", line.where, exc)
                self.summary.skipped_lines += 1

    def run(self, jobs: Iterable[Job], total: int | None = None) -> None:
        """Generate and save all `jobs`, batching consecutive compatible ones."""
        start = time.perf_counter()
        with tqdm(total=total, desc="images", unit="img", disable=not self.generator.progress) as bar:
            for batch in batches(jobs, self.batch_size):
                if self.before_batch is not None:
                    self.before_batch(batch)
                latents = self.generator.latents(batch)
                pixels = self.generator.decode(latents, self.output.vae_batch_size)
                pictures = images.tensor_to_pil(pixels)
                for job, picture in zip(batch, pictures):
                    self.summary.written.append(self._save(job, picture))
                self.summary.steps += batch[0].steps
                bar.update(len(batch))
                if self.output.preview is not None:
                    self.output.preview(pictures)
        self.summary.seconds += time.perf_counter() - start

    def _save(self, job: Job, picture) -> Path:
        self._sequence += 1
        name = images.output_file_name(
            timestamp=self._timestamp,
            index=self._sequence,
            seed=job.seed,
            sequential=self._sequence if self.output.sequential else None,
            prompt_file_name=job.file_name,
        )
        record = images.ImageRecord(
            prompt=job.prompt,
            seed=job.seed,
            sampler=self.output.sampler,
            steps=job.steps,
            scale=job.scale,
            width=job.width,
            height=job.height,
            negative_prompt=job.negative_prompt,
            negative_scale=job.negative_scale,
            clip_prompt=job.clip_prompt,
            raw_prompt=job.raw_prompt,
            model_name=self.output.model_name,
            model_hash=self.output.model_hash,
            clip_skip=self.output.clip_skip,
            karras=self.output.sampler.endswith("_karras"),
        )
        return images.save_image(picture, self.output.outdir, name, images.generation_text(record))


def run_rounds(runner: Runner, args: argparse.Namespace, lines_for_round: Callable[[], Iterable[Line]],
               seeds, total: int | None) -> None:
    """`--n_iter` rounds over the prompt lines; `--iter_same_seed` draws one seed per round."""
    for round_index in range(args.n_iter):
        if args.n_iter > 1:
            logger.info("iteration %d/%d", round_index + 1, args.n_iter)
        iter_seed = seeds.draw() if args.iter_same_seed else None
        runner.run(runner.jobs(lines_for_round(), seeds, iter_seed), total)
