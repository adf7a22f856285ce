"""The web UI's seed extras, sweeps and regeneration as command-line options (docs/webui.md):
declared here (`add_webui_groups`, called by `library.cli.parser`) and checked here
(`validate_webui`, called by `library.cli.validation`), before any model loads."""

from __future__ import annotations

import argparse

from library.errors import UserError
from library.records import limits


def add_webui_groups(p: argparse.ArgumentParser) -> None:
    """Variation seeds, seed resize, ENSD (docs/webui.md "# Seeds")."""
    g = p.add_argument_group("web UI seeds (docs/webui.md)")
    g.add_argument("--subseed", type=int, default=None,
                   help="variation seed of each line's first image, +1 per further image (default: seed + 1); "
                   "--vs per prompt")
    g.add_argument("--subseed_strength", type=float, default=None,
                   help="variation seed strength 0..1 (default 0: the seed's image; 1: the variation seed's); "
                   "with it above 0 a line's images share their first seed; --vss per prompt")
    g.add_argument("--seed_resize_from_w", type=int, default=None,
                   help="seed resize: draw the noise at this width (multiple of 8) and paste it centred, so a "
                   "seed's picture survives a change of size; --srw per prompt")
    g.add_argument("--seed_resize_from_h", type=int, default=None,
                   help="seed resize: draw the noise at this height (multiple of 8); --srh per prompt")
    g.add_argument("--eta_noise_seed_delta", type=int, default=None, metavar="ENSD",
                   help="re-seed each image's random stream with seed + ENSD after its start noise: changes "
                   "ancestral and SDE samplers' noise only (the web UI's ENSD, e.g. 31337)")
    g = p.add_argument_group("sweeps (docs/webui.md)")
    g.add_argument("--xyz", nargs="+", metavar='"AXIS: VALUES"',
                   help='X/Y/Z plot: up to three axes, e.g. "steps: 10-30 [3]" "sampler: Euler a, DDIM" '
                   '"prompt s/r: cat, dog"; every image saved, plus a labelled grid per prompt line and Z value')
    g.add_argument("--prompt_matrix", action="store_true",
                   help='prompt matrix: "base | a | b" makes base, base+a, base+b, base+a+b and a labelled grid')
    g = p.add_argument_group("regenerate from a PNG (docs/webui.md)")
    g.add_argument("--from_png", metavar="FILE|DIR",
                   help="make a PNG's picture again from its metadata (this tool's, the original tool's, or an "
                   "A1111/Forge parameters text), or each PNG of a folder; options given beside it override the "
                   "file's (--steps, --seed, --sampler, ...)")


def validate_webui(args: argparse.Namespace) -> None:
    """Ranges and combinations of the web-UI options; raises `UserError` with one line."""
    strength = args.subseed_strength
    if strength is not None:
        limits.check_finite([("--subseed_strength", strength)])
        if not 0 <= strength <= 1:
            raise UserError(f"--subseed_strength {strength:g}: must be between 0 and 1")
    if args.subseed is not None:
        limits.check_seed(args.subseed, "--subseed")
    if args.eta_noise_seed_delta is not None:
        limits.check_seed(args.eta_noise_seed_delta, "--eta_noise_seed_delta")
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8 or value > limits.MAX_SIDE):
            raise UserError(f"--{name} {value}: must be a positive multiple of 8, at most {limits.MAX_SIDE}")
    if (args.seed_resize_from_w is None) != (args.seed_resize_from_h is None):
        raise UserError("--seed_resize_from_w and --seed_resize_from_h go together: give both")
    validate_sweeps(args)


def validate_sweeps(args: argparse.Namespace) -> None:
    """`--xyz` axes and `--prompt_matrix`: names, values, cell counts, Prompt S/R search strings."""
    from library.prompts import sweeps

    if not args.xyz and not args.prompt_matrix:
        return
    if args.xyz and args.prompt_matrix:
        raise UserError("--xyz and --prompt_matrix exclude each other")
    option = "--xyz" if args.xyz else "--prompt_matrix"
    if args.interactive or args.from_module:
        raise UserError(f"{option} needs --prompt, --from_file or --from_png (its prompt lines are swept)")
    texts = _prompt_texts(args)
    if args.prompt_matrix:
        for text in texts:
            sweeps.prompt_matrix(text)
        return
    if len(args.xyz) > 3:
        raise UserError(f"--xyz: {len(args.xyz)} axes; at most three (X, Y, Z)")
    axes = [sweeps.parse_axis(text) for text in args.xyz]
    sweeps.check_cells(axes)
    sweeps.check_search(axes, texts)


def _prompt_texts(args: argparse.Namespace) -> list[str]:
    """The prompt lines of `--prompt` or a readable `--from_file` (an unreadable one is preflight's)."""
    from library.prompts.sources import read_prompt_file

    if args.prompt is not None:
        return [args.prompt]
    if args.from_file is not None:
        try:
            return [line.text for line in read_prompt_file(args.from_file)]
        except UserError:
            return []
    return []
