#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x / 2.x / XL: `python gen_img.py --ckpt MODEL --prompt "..."`.

The whole flow of a run; every step lives in `library/` (docs/architecture.md shows where).
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from library import interrupts
from library.cli.logging_setup import configure_logging
from library.cli.parser import parse_options
from library.errors import UserError
from library.messages import one_line, quiet_third_party
from library.records.options import Options
from library.run.process_exit import exit_without_teardown

logger = logging.getLogger("gen_img")


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    log_file = configure_logging(options.namespace)
    if logging.getLogger().level > logging.DEBUG:
        quiet_third_party()
    for note in getattr(options.namespace, "startup_warnings", ()):  # library.cli.compat's readings
        logger.warning("%s", note)
    from library.cli import preflight
    from library.records import limits
    from library.run import distributed, summary

    team = distributed.SOLO
    try:
        team = distributed.join(options)  # one process, or this one's share of a torchrun/accelerate run
        preflight.check_inputs(options)  # every input file and --outdir, before any model file opens
        # torch/diffusers load only now: --help, argument errors and missing files take a fraction of a second
        from library.run import build

        runtime = build.Runtime.from_options(options.load, team.place.local_rank)
        model = build.load(options.load, runtime)
        options = build.for_model(options, model)  # SDXL: 1024 x 1024 by default; SD 1.x/2.x: no size options
        networks = build.networks(options, model)
        pipeline = build.pipeline(options, model, runtime, networks)
        limits.check_defaults(options.generation, pipeline)
        runner = build.runner(options, model, pipeline, team)

        generate(options, runner, pipeline, networks.loaded, team)
        result = summary.combined(team.gather(runner.summary.to_dict()))  # every rank's images
    except UserError as exc:
        return failed(team, exc)
    except KeyboardInterrupt:
        if team.leads:
            interrupts.announce()  # one line, also when a second Ctrl+C ends the process meanwhile
        return interrupts.INTERRUPTED_STATUS
    finally:
        team.close()
        if log_file is not None:  # in-process callers (tests) run main() again
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    if team.leads:
        print(result.line())
    return summary.exit_status(result)


def generate(options: Options, runner, pipeline, networks: list, team) -> None:
    """Every image of the run, from its prompt source: the terminal, a `--from_module`
    prompter, or prompt lines (`--prompt`, `--from_file`, the sources' metadata)."""
    from library.prompts import sources as prompts
    from library.prompts.seeds import SeedSource
    from library.run.runner import run_rounds

    rounds, per_prompt = options.rounds, options.generation.images_per_prompt
    if rounds.interactive:
        seeds = SeedSource(rounds.seed, single_image=False)
        from library.run.interactive import read_prompt

        for line in prompts.interactive_lines(read_prompt):
            runner.run(runner.jobs([line], seeds, None))
    elif rounds.from_module is not None:
        # the prompter is asked again in every --n_iter round, with the run's seed_random
        seeds = SeedSource(rounds.seed, single_image=False)
        args = options.namespace  # the original's plugin signature takes the raw namespace
        prompter = prompts.load_prompter(rounds.from_module, args, pipeline, networks)
        run_rounds(runner, rounds, lambda iter_seed: prompts.module_lines(
            prompter, args, pipeline, seeds, iter_seed, per_prompt), seeds, None)
    else:
        lines = prompt_lines(options)
        # seed S itself only for one image in one round; otherwise Random(S) draws, in every round
        seeds = SeedSource(rounds.seed, single_image=len(lines) == 1 and per_prompt == 1 and rounds.n_iter == 1,
                           unseeded=team.seed)  # without --seed: the same draws on every rank
        total = sum(prompts.images_per_line(line, per_prompt) for line in lines) if lines else None
        shuffle = team.shuffler()
        if rounds.sweep or rounds.prompt_matrix:  # --xyz / --prompt_matrix: cell lines, then labelled grids
            from library.run.sweep_run import run_sweep

            run_sweep(runner, rounds, lines, seeds, per_prompt, team)
            return
        run_rounds(runner, rounds, lambda _: prompts.shuffled(lines, rounds.shuffle_prompts, shuffle), seeds, total)


def failed(team, exc: UserError) -> int:
    """Print the run's one error line and return its exit status. In a split run only the first
    rank to fail prints (an error every rank finds before they meet, only rank 0)."""
    from library.run import distributed

    if isinstance(exc, distributed.PeerFailed):
        return exc.exit_status
    first = team.fail(exc.exit_status)
    if team.size == 1 and not isinstance(exc, distributed.NotConnected):
        first = first and distributed.speaks_for_the_run()
    if first:
        where = f"rank {team.rank}: " if team.size > 1 and not team.leads else ""
        print(f"gen_img.py: error: {where}{one_line(str(exc))}", file=sys.stderr)
    return exc.exit_status


def prompt_lines(options: Options) -> list:
    """The prompt lines of `--prompt` or `--from_file` (or, with neither, of the
    `--image_path` sources' metadata); `--from_module` prompters are asked each round."""
    from library.prompts import sources as prompts

    rounds = options.rounds
    if rounds.png_lines:  # --from_png: one line per PNG, with its settings
        return [prompts.Line(text, where) for text, where in rounds.png_lines]
    if rounds.prompt is None and rounds.from_file is None:
        return prompts.metadata_lines(options.sources.image_path)
    if rounds.prompt is not None:
        return [prompts.Line(rounds.prompt, "--prompt")]
    return prompts.read_prompt_file(rounds.from_file)


if __name__ == "__main__":
    interrupts.install()  # Ctrl+C within a second, even inside a long torch call (library/interrupts.py)
    exit_without_teardown(main())  # sys.exit, minus ~1 s of freeing the model object by object
