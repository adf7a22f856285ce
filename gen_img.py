#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x / 2.x: `python gen_img.py --ckpt MODEL --prompt "..."`.

The whole flow of a run; every step lives in `library/` (see docs/ for the options).
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from library.cli import parse_args  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.messages import one_line, quiet_third_party  # noqa: E402

logger = logging.getLogger("gen_img")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    # torch/diffusers load only now: --help and argument errors come in a fraction of a second
    from library import build, limits, preflight, prompts, results
    from library.runner import run_rounds
    from library.seeds import SeedSource

    try:
        preflight.check_inputs(args)  # every input file and --outdir, before any model file is opened
        runtime = build.Runtime.from_args(args)
        model = build.load(args, runtime)
        build.optimize(args, model)
        networks = build.networks(args, model)
        generator = build.generator(args, model, runtime)
        limits.check_defaults(args, generator)
        build.vae_memory(args, model, generator)
        runner = build.runner(args, model, generator, networks.before_batch)

        if args.interactive:
            seeds = SeedSource(args.seed, single_image=False)
            for line in prompts.interactive_lines():
                runner.run(runner.jobs([line], seeds, None))
        else:
            lines = prompt_lines(args, generator, networks.loaded)
            seeds = SeedSource(args.seed, single_image=len(lines) == 1 and args.images_per_prompt == 1)
            total = len(lines) * args.images_per_prompt if lines else None
            run_rounds(runner, args, lambda: prompts.shuffled(lines, args.shuffle_prompts), seeds, total)
    except UserError as exc:
        print(f"gen_img.py: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(runner.summary.line())
    return results.exit_status(runner.summary)


def prompt_lines(args, generator, networks) -> list:
    """The prompt lines of `--prompt`, `--from_file` or `--from_module` (or, with none of them,
    of the `--image_path` sources' metadata)."""
    from library import img2img, prompts
    from library.seeds import SeedSource

    if args.prompt is None and args.from_file is None and args.from_module is None:
        return img2img.metadata_lines(args.image_path)
    if args.prompt is not None:
        return [prompts.Line(args.prompt, "--prompt")]
    if args.from_file is not None:
        return prompts.read_prompt_file(args.from_file)
    prompter = prompts.load_prompter(args.from_module, args, generator, networks)
    return list(prompts.module_lines(prompter, args, generator, SeedSource(args.seed, False), None))


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()


if __name__ == "__main__":
    sys.exit(main())
