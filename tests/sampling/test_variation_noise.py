"""Variation seeds, seed resize and ENSD: the noise arithmetic, and what they do to images."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from library.prompts.line_options import parse_prompt_line
from library.prompts.variation import line_variations
from library.records.variation_settings import Variation, VariationDefaults
from library.sampling.noise import draw_image_noise
from library.sampling.variation_noise import first_noise, paste_centred, slerp
from tests.helpers import meta, pixels, pngs, run


def _slerp_by_hand(v, low, high):
    """The formula written out element by element with Python floats."""
    channels, height, width = low.shape
    out = torch.empty_like(low)
    for c in range(channels):
        for x in range(width):
            a = [float(low[c, y, x]) for y in range(height)]
            b = [float(high[c, y, x]) for y in range(height)]
            na, nb = math.sqrt(sum(t * t for t in a)), math.sqrt(sum(t * t for t in b))
            w = math.acos(sum(p * q for p, q in zip(a, b)) / (na * nb))
            for y in range(height):
                out[c, y, x] = math.sin((1 - v) * w) / math.sin(w) * a[y] + math.sin(v * w) / math.sin(w) * b[y]
    return out


def test_slerp_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                        dtype=torch.float64)
    assert torch.allclose(slerp(0.3, low, high), _slerp_by_hand(0.3, low, high), atol=1e-12)
    assert torch.equal(slerp(0.0, low, high), low)
    assert torch.equal(slerp(1.0, low, high), high)


def test_slerp_falls_back_to_linear_for_nearly_equal_noises():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    high = low + 1e-3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # mean cosine > 0.9995
    assert torch.equal(slerp(0.25, low, high), 0.75 * low + 0.25 * high)


def test_seed_resize_pastes_the_small_noise_centred_in_the_seed_full_size_noise():
    g = torch.Generator().manual_seed(7)
    noise = first_noise(7, Variation(None, 0.0, (32, 16)), (4, 6, 8), g, "cpu", torch.float32)
    small = torch.randn((4, 2, 4), generator=torch.Generator().manual_seed(7))
    full = torch.randn((4, 6, 8), generator=torch.Generator().manual_seed(7))
    expected = full.clone()
    expected[:, 2:4, 2:6] = small
    assert torch.equal(noise, expected)
    # the image's own stream made exactly one full-size draw, as without a resize
    plain = torch.Generator().manual_seed(7)
    torch.randn((4, 6, 8), generator=plain)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=plain))


def test_paste_crops_a_larger_noise_to_its_centre():
    small = torch.arange(1 * 4 * 6, dtype=torch.float32).reshape(1, 4, 6)
    out = paste_centred(small, torch.zeros(1, 2, 2))
    assert out.tolist() == [[[8.0, 9.0], [14.0, 15.0]]]


def test_strength_0_and_1_give_the_seed_and_the_subseed_noise():
    shape = (4, 8, 8)
    plain = draw_image_noise([5], shape, steps=2, noises_per_step=1, img2img=False, device="cpu",
                             dtype=torch.float32)
    none = draw_image_noise([5], shape, steps=2, noises_per_step=1, img2img=False, device="cpu",
                            dtype=torch.float32, variations=[Variation(9, 0.0)])
    full = draw_image_noise([5], shape, steps=2, noises_per_step=1, img2img=False, device="cpu",
                            dtype=torch.float32, variations=[Variation(9, 1.0)])
    sub = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(none.initial, plain.initial)
    assert torch.equal(full.initial[0], sub)


def test_line_variations_share_the_first_seed_and_count_up_subseeds():
    line = parse_prompt_line("a cat --vs 100 --vss 0.2")
    mains, variations = line_variations([11, 12, 13], VariationDefaults(), line.overrides, False)
    assert mains == [11, 11, 11]
    assert variations == [Variation(100, 0.2), Variation(101, 0.2), Variation(102, 0.2)]
    mains, variations = line_variations([11, 12], VariationDefaults(strength=0.5), parse_prompt_line("x").overrides,
                                        True)
    assert mains == [11, 12] and variations == [Variation(12, 0.5), Variation(14, 0.5)]
    mains, variations = line_variations([3], VariationDefaults(), parse_prompt_line("x").overrides, False)
    assert (mains, list(itertools.islice(variations, 1))) == ([3], [None])  # no strength: one lazy None each


FAST = ["--sampler", "ddim", "--scale", "5"]


def test_strength_0_is_the_plain_seed_and_1_is_the_subseed_image(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "plain", *FAST, "--prompt", "a cat --d 5") == 0
    assert run(tiny_models, tmp_path / "zero", *FAST, "--prompt", "a cat --d 5 --vs 9 --vss 0") == 0
    assert run(tiny_models, tmp_path / "sub", *FAST, "--prompt", "a cat --d 9") == 0
    assert run(tiny_models, tmp_path / "one", *FAST, "--prompt", "a cat --d 5", "--subseed", "9",
               "--subseed_strength", "1") == 0
    assert run(tiny_models, tmp_path / "half", *FAST, "--prompt", "a cat --d 5 --vs 9 --vss 0.5") == 0
    plain, zero, sub, one, half = (pixels(pngs(tmp_path / d)[0]) for d in ("plain", "zero", "sub", "one", "half"))
    assert np.array_equal(zero, plain)
    assert np.array_equal(one, sub)
    assert np.abs(half - plain).max() > 0 and np.abs(half - sub).max() > 0
    info = meta(pngs(tmp_path / "one")[0])
    assert (info["seed"], info["variation-seed"], info["variation-seed-strength"]) == ("5", "9", "1.0")
    assert "Seed: 5, Size: 64x64" in info["parameters"]
    assert info["parameters"].endswith("Variation seed: 9, Variation seed strength: 1")
    assert "variation-seed" not in meta(pngs(tmp_path / "zero")[0])
    assert "Variation seed" not in meta(pngs(tmp_path / "zero")[0])["parameters"]


def test_variation_images_do_not_depend_on_their_batch(tiny_models, tmp_path):
    common = [*FAST, "--prompt", "a cat --vss 0.3 --srw 32 --srh 48", "--seed", "4", "--images_per_prompt", "3",
              "--sampler", "euler_a", "--eta_noise_seed_delta", "31337"]
    assert run(tiny_models, tmp_path / "one", *common, "--batch_size", "1") == 0
    assert run(tiny_models, tmp_path / "three", *common, "--batch_size", "3") == 0
    ones, threes = pngs(tmp_path / "one"), pngs(tmp_path / "three")
    # oneDNN's batch-size-dependent kernels move a pixel by one level at most (as for plain seeds)
    assert [int(np.abs(pixels(a) - pixels(b)).max()) <= 1 for a, b in zip(ones, threes)] == [True] * 3
    infos = [meta(p) for p in ones]
    assert {i["seed"] for i in infos} == {infos[0]["seed"]}
    first = int(infos[0]["seed"])
    assert [i["variation-seed"] for i in infos] == [str(first + 1), str(first + 2), str(first + 3)]
    assert infos[0]["seed-resize-from"] == "32x48" and infos[0]["eta-noise-seed-delta"] == "31337"
    assert "Seed resize from: 32x48, ENSD: 31337" in infos[0]["parameters"]


@pytest.mark.parametrize(("sampler", "changes"), [("euler_a", True), ("ddim", False)])
def test_ensd_changes_an_ancestral_image_only(tiny_models, tmp_path, sampler, changes):
    args = ["--sampler", sampler, "--scale", "5", "--prompt", "a cat --d 5"]
    assert run(tiny_models, tmp_path / "plain", *args) == 0
    assert run(tiny_models, tmp_path / "ensd", *args, "--eta_noise_seed_delta", "31337") == 0
    plain, ensd = pixels(pngs(tmp_path / "plain")[0]), pixels(pngs(tmp_path / "ensd")[0])
    assert bool(np.abs(plain - ensd).max() > 0) is changes


@pytest.mark.parametrize(("extra", "message"), [
    (["--subseed_strength", "1.5"], "--subseed_strength 1.5: must be between 0 and 1"),
    (["--subseed_strength", "-0.1"], "--subseed_strength -0.1: must be between 0 and 1"),
    (["--seed_resize_from_w", "500", "--seed_resize_from_h", "512"],
     "--seed_resize_from_w 500: must be a positive multiple of 8, at most 8192"),
    (["--seed_resize_from_w", "512"], "--seed_resize_from_w and --seed_resize_from_h go together: give both"),
    (["--subseed", "-1"], "--subseed -1: seeds are 0 to 4294967295 (2**32 - 1)"),
])
def test_bad_seed_extras_are_one_line(tmp_path, capsys, extra, message):
    import gen_img

    with pytest.raises(SystemExit) as exc:
        gen_img.main(["--prompt", "x", "--outdir", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"gen_img.py: error: {message} (see --help)\n"


def test_bad_prompt_line_strength_and_resize(tiny_models, tmp_path, caplog):
    lines = tmp_path / "p.txt"
    lines.write_text("a --vss 2\nb --srw 30 --srh 32\nc --srw 32\n")
    assert run(tiny_models, tmp_path / "out", "--from_file", str(lines)) != 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f'{lines}:1: skipped: prompt option --vss expects a value from 0 to 1, got "2" (e.g. --vss 0.1)',
        f'{lines}:2: skipped: prompt option --srw expects a positive multiple of 8, got "30" (e.g. --srw 512)',
        f"{lines}:3: skipped: --srw/--srh (--seed_resize_from_w/--seed_resize_from_h): a seed resize needs both "
        "the width and the height",
    ]

