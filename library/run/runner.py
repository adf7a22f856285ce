"""The run loop: prompt lines -> Jobs -> batches -> images on disk, with progress and summary.

Consecutive images with equal settings share a batch up to `--batch_size`, across prompt
lines (in interactive mode each prompt is finished before the next is read). Each image is
saved as soon as its batch is decoded, atomically and with its metadata.

img2img (`SourceImages`) attaches each image's source while Jobs are made; a batch with
sources is encoded and denoised from them, and inpainted images are composited with the
source's VAE round-trip outside the mask. Highres fix (`HighresFix`) makes each batch in
two stages, saving the 1st-stage images too with `--highres_fix_save_1st`.

Every Job is numbered in the order it is made and its file names are planned before
anything is generated (`output_files.NamePlan`): a name never depends on what was written
before or by whom, so a run split over processes (`library.run.distributed`, each generating
its share of the batches) and a run resumed with `--skip_existing` give the files of one
uninterrupted process.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.errors import UserError
from library.images import input_images, output_files
from library.images import metadata as image_metadata
from library.images.input_images import GuideImages
from library.images.job_record import job_options_text
from library.images.run_metadata import joined_fields, lora_tags, prompt_tags
from library.images.seed_metadata import seed_metadata
from library.progress import progress as tqdm
from library.prompts.sources import Defaults, Line, jobs_for_line
from library.records import limits
from library.records.jobs import Job, batches
from library.records.options import RoundOptions
from library.run.distributed import SOLO, Team
from library.run.summary import Summary
from library.sampling.checks import check_pixels
from library.sampling.highres_fix import HighresFix
from library.sampling.img2img import SourceImages, composite
from library.sampling.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: Jobs of a line checked together before its first image (the rest are checked as they come).
CHECKED_UP_FRONT = 1024


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
    use_original_name: bool = False  # `--use_original_file_name`: name after the img2img source
    run_metadata: tuple[tuple[str, object], ...] = ()  # VAE, eta, Lora/TI hashes (`library.images.run_metadata`)
    lora_files: tuple[str, ...] = ()  # for the `<lora:name:w>` tags of the A1111 prompt
    lora_multipliers: tuple[float, ...] = ()  # defaults; a line's --am wins
    timestamp: str = field(default_factory=output_files.timestamp_now)  # of default file names
    skip_existing: bool = False  # `--skip_existing`: batches whose files are all there are not made
    run_text: tuple[tuple[str, str], ...] = ()  # the `run-options` PNG text item (`library.images.job_record`)
    announce: Callable[[int, Path], None] | None = None  # called with (seed, file) after each image (interactive)


@dataclass(frozen=True)
class BatchNames:
    """The planned file names of one batch: 1st-stage images (Highres fix), then the final ones."""

    first: list[str]
    final: list[str]

    def all(self) -> list[str]:
        return [*self.first, *self.final]


class Runner:
    """Turns prompt lines into saved images with one Pipeline."""

    def __init__(self, pipeline: Pipeline, defaults: Defaults, output: OutputSettings,
                 batch_size: int, sources: SourceImages | None = None, highres: HighresFix | None = None,
                 guides: GuideImages | None = None, team: Team = SOLO) -> None:
        self.pipeline = pipeline
        self.defaults = defaults
        self.output = output
        self.batch_size = batch_size
        self.sources = sources
        self.highres = highres
        self.guides = guides
        self.team = team
        self.show_progress = pipeline.progress and team.leads
        if team.size > 1:
            pipeline.progress = False  # one bar for a split run: its images, not each batch's steps
        self.summary = Summary()
        self._names = output_files.NamePlan()
        self._existing = output_files.ExistingImages(output.outdir) if output.skip_existing else None
        self._jobs_made = 0  # Jobs numbered so far (the next Job's index)
        self._batches_made = 0  # batches formed so far, by every process alike (the next one's number)
        self.saved: list[tuple[Job, Path]] = []  # final images written by this process (sweep grids read them)

    def jobs(self, lines: Iterable[Line], seeds, iter_seed: int | None) -> Iterator[Job]:
        """Jobs of every line, made as the batches take them; a malformed line is reported (file
        and line) and skipped. A line's first `CHECKED_UP_FRONT` Jobs are checked before any is
        given out, so a bad line makes no image; later ones (a huge `--images_per_prompt`) as
        they come, and the first that fails ends its line there."""
        for line in lines:
            made = jobs_for_line(line, self.defaults, seeds, iter_seed, self.pipeline.encoder.chunk_count)
            try:
                first = self._checked(list(itertools.islice(made, CHECKED_UP_FRONT)), line)
            except UserError as exc:
                self._skip(line, exc)
                continue
            yield from map(self._numbered, first)
            for job in made:
                try:
                    (job,) = self._checked([job], line)
                except UserError as exc:
                    self._skip(line, exc)
                    break
                yield self._numbered(job)

    def _checked(self, made: list[Job], line: Line) -> list[Job]:
        """`made` with their sources, after every check of a Job (raises `UserError`)."""
        if self.sources is not None:  # the size may come from the source
            made = [self.sources.assign(job, line.image) for job in made]
        limits.check_jobs(made, self.pipeline, self.highres)  # sizes and steps the model can make
        for job in made:
            self.pipeline.check_job(job)
            if self.highres is not None:
                self.highres.stages(job)  # a size too small for the 1st stage skips the line
        return made

    def _skip(self, line: Line, exc: UserError) -> None:
        """Report a skipped line (by one process of a split run: all skip the same lines) and count it."""
        if self.team.leads:
            logger.error("%s: skipped: %s", line.where, exc)
        self.summary.skipped_lines += 1
        self.summary.first_skip = self.summary.first_skip or f"{line.where}: {exc}"

    def _numbered(self, job: Job) -> Job:
        """`job` with its index in the run (and its guide image)."""
        if self.guides is not None:
            group = self.guides.next_group()  # one guide per ControlNet, or one for all
            job = replace(job, guide_image=group[0], control_guides=group if len(group) > 1 else ())
        index, self._jobs_made = self._jobs_made, self._jobs_made + 1
        return replace(job, index=index)

    def run(self, jobs: Iterable[Job], total: int | None = None) -> None:
        """Generate and save all `jobs` (this process's share of them), batching consecutive
        compatible ones; with `--skip_existing` a batch whose files are all there is skipped."""
        start = time.perf_counter()
        with tqdm(total=total, desc="images", unit="img", disable=not self.show_progress) as bar:
            for batch in batches(jobs, self.batch_size):
                number, self._batches_made = self._batches_made, self._batches_made + 1
                names = self._plan(batch)  # every process plans every name, in the same order
                if not self.team.owns(number):
                    continue
                self.team.check()
                if self._existing is None:
                    self._make(batch, names)
                elif all(name in self._existing for name in names.all()):
                    self.summary.existing += len(batch)
                else:
                    for name in names.all():
                        self._existing.remove_stale_parts(name)
                    self._make(batch, names)
                self.team.done(len(batch), bar)
            self.team.end_round(bar)
        self.summary.seconds += time.perf_counter() - start

    def _plan(self, batch: list[Job]) -> BatchNames:
        """The batch's file names in the order one process writes them (1st stage first)."""
        stage = "1" if self.highres is not None else ""
        first = [self._names.claim(self._name(job, "0")) for job in batch] if self._saves_first() else []
        return BatchNames(first, [self._names.claim(self._name(job, stage)) for job in batch])

    def _saves_first(self) -> bool:
        return self.highres is not None and self.highres.settings.save_1st

    def _name(self, job: Job, stage: str) -> str:
        original = Path(job.init_image).name if self.output.use_original_name and job.init_image else None
        return output_files.output_file_name(
            timestamp=self.output.timestamp,
            index=job.index,  # from 000, as the original (`sequential` counts from 1, as the original)
            seed=job.seed,
            highres_stage=stage,
            sequential=job.index + 1 if self.output.sequential else None,
            original_name=original,
            prompt_file_name=job.file_name,
        )

    def _make(self, batch: list[Job], names: BatchNames) -> None:
        """Generate one batch and save its images under their planned names."""
        pictures = input_images.tensor_to_pil(check_pixels(self._pixels(batch, names.first)))
        stage = "1" if self.highres is not None else ""
        for job, picture, name in zip(batch, pictures, names.final):
            self._save(job, picture, name, stage)
        self.summary.steps += batch[0].steps
        if self.output.preview is not None:
            self.output.preview(pictures)

    def _pixels(self, batch: list[Job], first_names: list[str]):
        """The batch's final images as a [-1, 1] tensor."""
        pipeline, vae_batch_size = self.pipeline, self.output.vae_batch_size
        if self.highres is not None:
            def save_first(jobs: list[Job], pictures: list) -> None:
                for job, picture, name in zip(jobs, pictures, first_names):
                    self._save(job, picture, name, "0")

            return pipeline.decode(self.highres.generate(pipeline, batch, vae_batch_size, save_first, self.sources),
                              vae_batch_size)
        if batch[0].init_image is None:
            return pipeline.decode(pipeline.latents(batch), vae_batch_size)
        init = self.sources.load(batch, vae_batch_size)
        pixels = pipeline.decode(pipeline.latents(batch, init), vae_batch_size)
        if init.pixel_masks is None or init.source_latents is None:
            return pixels
        return composite(pixels, pipeline.decode(init.source_latents, vae_batch_size), init.pixel_masks)

    def _save(self, job: Job, picture, name: str, stage: str) -> None:
        """Save one image under `name` (the next free variant of it if a file has it), with its
        metadata; with `--skip_existing` an image whose file is there is not written again."""
        if self._existing is not None and name in self._existing:
            self.summary.existing += stage != "0"  # counted once per image, by its final file
            return
        extra = self.highres.metadata(job) if stage == "1" else ()
        features = self.pipeline.metadata(job)  # each feature's own (`Feature.metadata`), in their order
        features = seed_metadata(job.variation, self.pipeline.eta_noise_seed_delta) + features
        regen = (*job_options_text(job, self.output.lora_multipliers or None, self.defaults.hypernetworks),
                 *self.output.run_text)
        extra = joined_fields((*extra, *features.parameters, *self.output.run_metadata))
        tags = lora_tags(self.output.lora_files, job.network_multipliers or self.output.lora_multipliers)
        tags += prompt_tags(job)
        record = image_metadata.ImageRecord(
            prompt=job.prompt,
            seed=job.seed,
            sampler=job.sampler or self.output.sampler,
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
            strength=job.strength,
            karras=(job.sampler or self.output.sampler).endswith("_karras"),
            extra=extra,
            a1111_prompt_suffix=tags,
            feature_text=(*features.text, *regen),
        )
        path = output_files.save_image(picture, self.output.outdir, name, image_metadata.generation_text(record),
                                       variant_of=self._names.asked(name))
        self.summary.written.append(path)
        if stage != "0":
            self.saved.append((job, path))
            if self.output.announce is not None:
                self.output.announce(job.seed, path)


def run_rounds(runner: Runner, rounds: RoundOptions, lines_for_round: Callable[[int | None], Iterable[Line]],
               seeds, total: int | None) -> None:
    """`--n_iter` rounds over the prompt lines (`lines_for_round(iter_seed)` each round);
    `--iter_same_seed` draws one seed per round."""
    for round_index in range(rounds.n_iter):
        if rounds.n_iter > 1:
            logger.info("iteration %d/%d", round_index + 1, rounds.n_iter)
        iter_seed = seeds.draw() if rounds.iter_same_seed else None
        runner.run(runner.jobs(lines_for_round(iter_seed), seeds, iter_seed), total)
