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
