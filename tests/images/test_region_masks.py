"""Region masks: channel and colour-code rules, whole-image fallbacks, resizing, token grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.images.region_masks import color_code, load_region_mask, resized, token_grid


def save(tmp_path, pixels: np.ndarray, name: str = "mask.png", mode: str | None = None):
    path = tmp_path / name
    Image.fromarray(pixels, mode).save(path)
    return path


def test_colour_codes_are_the_bits_of_the_index_plus_one():
    assert [color_code(i) for i in range(7)] == [
        (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255), (255, 0, 255), (0, 255, 255), (255, 255, 255)]


def test_channel_mode_reads_fractions_and_gives_empty_channels_the_whole_image(tmp_path):
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = (51, 255, 0)
    pixels[1, 3] = (255, 0, 0)
    mask = load_region_mask(str(save(tmp_path, pixels)), None, None)
    regions = mask.regions(4)
    assert regions.shape == (4, 2, 4)
    assert regions[0, 0, 0].item() == pytest.approx(0.2) and regions[0, 1, 3].item() == 1.0
    assert regions[0].sum().item() == pytest.approx(1.2)
    assert regions[1].sum().item() == 1.0  # one green pixel
    assert bool((regions[2] == 1).all()) and bool((regions[3] == 1).all())  # blue empty; a 4th part: whole
    assert mask.mode == "RGB channels"


def test_colour_code_mode_matches_exact_colours_only(tmp_path):
    pixels = np.zeros((1, 6, 3), np.uint8)
    pixels[0] = [(255, 0, 0), (254, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255), (255, 255, 255)]
    mask = load_region_mask(str(save(tmp_path, pixels)), 3, None)
    regions = mask.regions(5)
    assert regions[0, 0].tolist() == [1, 0, 0, 0, 0, 0]  # (254, 0, 0) is no colour code
    assert regions[1, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert regions[2, 0].tolist() == [0, 0, 0, 1, 0, 0]  # yellow = code 3
    assert regions[3, 0].tolist() == [1] * 6 and regions[4, 0].tolist() == [1] * 6  # beyond K = 3: whole image
    assert mask.mode == "colour codes (3)"


def test_alpha_is_dropped_and_greyscale_fills_every_channel(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # transparent red still counts, as in the original
    mask = load_region_mask(str(save(tmp_path, rgba, "a.png", "RGBA")), 1, None)
    assert mask.regions(1)[0, 0].tolist() == [1, 0]
    grey = np.array([[0, 255]], np.uint8)
    mask = load_region_mask(str(save(tmp_path, grey, "g.png", "L")), None, None)
    assert mask.regions(3)[:, 0].tolist() == [[0, 1], [0, 1], [0, 1]]


def test_with_a_size_the_mask_is_resized_lanczos_first(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, 4:, 1] = 255
    path = save(tmp_path, pixels)
    mask = load_region_mask(str(path), None, (16, 4))
    expected = np.asarray(Image.open(path).convert("RGB").resize((16, 4), Image.Resampling.LANCZOS))
    assert mask.pixels.shape == (4, 16, 3) and np.array_equal(mask.pixels, expected)


@pytest.mark.parametrize("codes,why", [
    (None, "all three channels are black"),
    (2, "no pixel is exactly one of the colour codes red, green"),
])
def test_a_mask_without_any_region_is_refused(tmp_path, codes, why):
    pixels = np.zeros((4, 4, 3), np.uint8)
    if codes:
        pixels[:] = (0, 0, 255)  # blue is code 3, beyond K = 2
    path = save(tmp_path, pixels)
    with pytest.raises(UserError) as caught:
        load_region_mask(str(path), codes, None)
    assert str(caught.value) == (
        f"--mask_path {path}: not a region mask: {why}; paint each part's region (R, G, B channels, or exact "
        "colour codes with --network_regional_mask_max_color_codes)")


def test_resized_is_bilinear_without_corner_alignment():
    regions = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    expected = F.interpolate(regions[None], (5, 7), mode="bilinear", align_corners=False)[0]
    assert torch.equal(resized(regions, 5, 7), expected)
    assert resized(regions, 3, 4) is regions


@pytest.mark.parametrize("tokens,latent,grid", [
    (64, (8, 8), (8, 8)), (16, (8, 8), (4, 4)), (256, (8, 32), (8, 32)), (64, (8, 32), (4, 16)),
    (120, (60, 32), (15, 8)),  # an odd level of a 480x256 image
    (28, (60, 30), (7, 4)),
    (36, (8, 8), (6, 6)), (72, (8, 16), (6, 12)),  # Deep Shrink / Gradual Latent sizes: no table needed
])
def test_token_grid_finds_the_resolution_met(tokens, latent, grid):
    assert token_grid(tokens, *latent) == grid
