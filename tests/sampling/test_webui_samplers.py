"""The web UI's sampler names: their mapping to ours, the SDE sampler's per-image noise, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from library.errors import UserError
from library.records.webui_samplers import canonical_sampler
from tests.helpers import meta, pixels, pngs, run


@pytest.mark.parametrize(("name", "ours"), [
    ("Euler a", "euler_a"), ("Euler", "euler"), ("LMS", "lms"), ("LMS Karras", "lms_karras"), ("Heun", "heun"),
    ("DPM2", "dpm_2"), ("DPM2 a", "dpm_2_a"), ("DPM2 a Karras", "dpm_2_a_karras"), ("DPM++ 2M", "dpmsolver++"),
    ("DPM++ 2M Karras", "dpmsolver++_karras"), ("DPM++ 2M SDE", "dpmsolver++_sde"),
    ("DPM++ 2M SDE (Karras)", "dpmsolver++_sde_karras"), ("dpm++ 2m sde karras", "dpmsolver++_sde_karras"),
    ("DDIM", "ddim"), ("PLMS", "pndm"), ("UniPC", "unipc"), ("LCM", "lcm"), ("euler_a", "euler_a"),
    ("k_euler", "k_euler"),
])
def test_webui_names_map_to_ours(name, ours):
    assert canonical_sampler(name) == ours


@pytest.mark.parametrize(("name", "message"), [
    ("DPM++ SDE Karras", "--sampler DPM++ SDE Karras: not available (its single-step SDE solver needs torchsde's "
     "Brownian tree, not per-image noise); the closest here is --sampler dpmsolver++_sde_karras"),
    ("DPM++ 2S a", "--sampler DPM++ 2S a: not available (diffusers has no ancestral single-step DPM++ solver); "
     "the closest here is --sampler dpm_2_a"),
    ("Euler a Karras", "--sampler Euler a Karras: the web UI's euler a has no Karras schedule here; use --sampler "
     "euler_a or another Karras sampler"),
])
def test_names_we_cannot_honour_are_one_line_naming_the_closest(name, message):
    with pytest.raises(UserError) as exc:
        canonical_sampler(name)
    assert str(exc.value) == message


def test_a_webui_name_makes_the_same_image_and_is_written_back(tiny_models, tmp_path):
    assert run(tiny_models, tmp_path / "webui", "--sampler", "DPM++ 2M Karras", "--prompt", "a cat --d 3") == 0
    assert run(tiny_models, tmp_path / "ours", "--sampler", "dpmsolver++_karras", "--prompt", "a cat --d 3") == 0
    (webui,), (ours,) = pngs(tmp_path / "webui"), pngs(tmp_path / "ours")
    assert np.array_equal(pixels(webui), pixels(ours))
    assert meta(webui)["sampler"] == "dpmsolver++_karras"
    assert "Sampler: DPM++ 2M Karras," in meta(webui)["parameters"]


def test_sde_sampler_noise_is_per_image(tiny_models, tmp_path):
    common = ["--sampler", "DPM++ 2M SDE", "--prompt", "a cat", "--seed", "2", "--images_per_prompt", "3"]
    assert run(tiny_models, tmp_path / "one", *common, "--batch_size", "1") == 0
    assert run(tiny_models, tmp_path / "three", *common, "--batch_size", "3") == 0
    assert run(tiny_models, tmp_path / "ensd", *common, "--eta_noise_seed_delta", "5") == 0
    ones, threes, ensd = pngs(tmp_path / "one"), pngs(tmp_path / "three"), pngs(tmp_path / "ensd")
    assert [int(np.abs(pixels(a) - pixels(b)).max()) <= 1 for a, b in zip(ones, threes)] == [True] * 3
    assert np.abs(pixels(ones[0]) - pixels(ensd[0])).max() > 5  # its noise comes from the image's stream
    assert "Sampler: DPM++ 2M SDE," in meta(ones[0])["parameters"]
