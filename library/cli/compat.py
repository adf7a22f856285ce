"""The original's lenient readings of a command line, each made explicit by one warning line.

A script written for the original must run unchanged, so a few combinations this tool would
otherwise refuse are read the way the original reads them, and the run says so once:

* `--prompt` together with `--from_file`, `--from_module` or `--interactive`: the original takes
  the terminal first, then the file, then the module, and never reads `--prompt`.
* `--gradual_latent_timesteps` with a sampler other than euler_a / k_euler_a: the original
  generates without Gradual Latent.
* Fewer `--control_net_preps/weights/ratios` (alias `--control_net_multipliers`) or
  `--network_mul` values than models: the first models take the values, the others the
  original's defaults (preprocessing none, weight 1.0, ratio 1.0, multiplier 1.0).

`adapt` runs before `library.cli.validation.validate`; it changes the namespace and returns the
warning lines, which `gen_img.main` logs once logging is set up (`Options.namespace.startup_warnings`).
"""

from __future__ import annotations

import argparse

#: option -> (the option whose model count it follows, the original's default for a missing value)
PER_MODEL_DEFAULTS: dict[str, tuple[str, object]] = {
    "control_net_preps": ("control_net_models", "none"),
    "control_net_weights": ("control_net_models", 1.0),
    "control_net_ratios": ("control_net_models", 1.0),
    "network_mul": ("network_module", 1.0),
}

#: the prompt sources in the order the original looks at them (the first one given wins)
_SOURCES = ("interactive", "from_file", "from_module")


def adapt(args: argparse.Namespace) -> list[str]:
    """Read `args` as the original does where it differs from this tool's strict reading; the
    warning line of each such reading, in order."""
    notes = [note for note in (_prompt_source(args), _gradual_latent_sampler(args)) if note]
    notes += _short_per_model_lists(args)
    return notes


def _prompt_source(args: argparse.Namespace) -> str | None:
    """`--prompt` beside another prompt source: that source, as the original."""
    other = next((name for name in _SOURCES if getattr(args, name, None)), None)
    if args.prompt is None or other is None:
        return None
    args.prompt = None
    return f"--prompt ignored: --{other} gives the prompts (as the original); leave one of them out"


def _gradual_latent_sampler(args: argparse.Namespace) -> str | None:
    """`--gradual_latent_timesteps` with a sampler that cannot grow the latent: off, as the original."""
    if args.gradual_latent_timesteps is None:
        return None
    from library.records.gradual_latent_settings import SAMPLERS  # imports torch: only when asked for

    if args.sampler in SAMPLERS:
        return None
    args.gradual_latent_timesteps = None
    return (f"--gradual_latent_timesteps ignored: Gradual Latent works with --sampler euler_a or k_euler_a, "
            f"not {args.sampler}; generating without it (as the original)")


def _short_per_model_lists(args: argparse.Namespace) -> list[str]:
    """Per-model values shorter than the model list, filled with the original's defaults."""
    notes = []
    for name, (models_option, default) in PER_MODEL_DEFAULTS.items():
        values, models = getattr(args, name, None), getattr(args, models_option, None) or []
        if not values or len(values) >= len(models):
            continue
        filled = len(models) - len(values)
        setattr(args, name, [*values, *[default] * filled])
        notes.append(f"--{name} has {len(values)} value(s) for {len(models)} models (--{models_option}): "
                     f"the last {filled} take the default {default} (as the original)")
    return notes
