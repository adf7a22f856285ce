"""`nan` and `inf` are refused for every float option of the command line, with one line,
before any other check of it (so a range check never speaks first with another message)."""

from __future__ import annotations

import pytest

from library.cli.parser import build_parser, parse_args

FLOAT_OPTIONS = [
    (action.option_strings[0], action.nargs)
    for action in build_parser()._actions
    if action.type is float
]


def test_the_float_options_are_found():
    names = [name for name, _ in FLOAT_OPTIONS]
    assert {"--scale", "--gradual_latent_s_noise", "--clip_guidance_scale", "--vgg16_guidance_scale",
            "--noise_offset_prob", "--ds_ratio", "--network_mul"} <= set(names)


CASES = [(name, nargs, value) for name, nargs in FLOAT_OPTIONS for value in ("nan", "inf", "-inf")
         if not (value == "-inf" and isinstance(nargs, int))]  # argparse reads a lone "-inf" as an option


@pytest.mark.parametrize("option, nargs, value", CASES, ids=[f"{n} {v}" for n, _, v in CASES])
def test_every_float_option_refuses_non_finite_values(option, nargs, value, capsys):
    count = nargs if isinstance(nargs, int) else 1
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--ckpt", "m.safetensors", "--prompt", "x", f"{option}={value}" if count == 1 else option,
                    *([value] * count if count > 1 else [])])
    assert exit_.value.code == 2
    shown = float(value)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"gen_img.py: error: {option} {shown}: must be a finite number (see --help)"
