"""VAE memory options: --vae_slices equals the one-piece VAE, --vae_batch_size, --vae_tiling."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from library.models.tiny import build_tiny_components
from library.records.options import vae_batch_size
from library.sampling import vae_slices as vae_memory
from library.sampling.pipeline import Pipeline
from tests.helpers import make_source, pixels, pngs
from tests.helpers import run_img2img as run

LEVEL = 2 / 255  # one 8-bit level in the VAE's [-1, 1] output range


@pytest.fixture(scope="module")
def vae():
    return build_tiny_components("sd1").vae


def _latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slices", [2, 3, 5, 16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 12, 16), (1, 4, 7, 9)])
def test_sliced_decode_equals_the_one_piece_decode(vae, shape, slices):
    z = _latents(shape)
    with torch.no_grad():
        whole = vae.decode(z).sample
        sliced = vae_memory.sliced_decode(vae, z, slices)
    assert sliced.shape == whole.shape
    assert (sliced - whole).abs().max().item() < LEVEL / 10  # well within 1/255


def test_naive_band_decoding_is_not_equal(vae):
    """Why the streaming design: bands decoded on their own differ by far more than 1/255."""
    z = _latents((1, 4, 16, 16))
    with torch.no_grad():
        whole = vae.decode(z).sample
        naive = torch.cat([vae.decode(band).sample for band in z.split(4, dim=2)], dim=2)
    assert (naive - whole).abs().max().item() > 20 * LEVEL


@pytest.mark.parametrize("slices", [2, 4, 7])
def test_sliced_encode_equals_the_one_piece_encode(vae, slices):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).latent_dist.parameters
        sliced = vae_memory.sliced_encode_moments(vae, x, slices)
    assert (sliced - whole).abs().max().item() < 1e-4


def test_segments_cut_after_each_resnet_and_keep_resampling_where_it_is_cheap(vae):
    decoder = [[kind for kind, _ in s] for s in vae_memory.segments(vae_memory.decoder_units(vae.decoder))]
    assert decoder[:3] == [["resnet"], ["resnet"], ["up", "resnet"]]
    assert decoder[-1] == ["norm", "act", "conv"]
    encoder = [[kind for kind, _ in s] for s in vae_memory.segments(vae_memory.encoder_units(vae.encoder))]
    assert encoder[:2] == [["conv", "resnet", "down"], ["resnet", "down"]]  # one resnet per block here
    assert encoder[-1] == ["resnet"]


def test_sliced_decode_keeps_the_input(vae):
    z = _latents((1, 4, 8, 8))
    with torch.no_grad():
        hidden = vae.decoder.mid_block(vae.decoder.conv_in(vae.post_quant_conv(z)), None)
        copy = hidden.clone()
        vae_memory.run_units(vae_memory.decoder_units(vae.decoder), hidden, 3)
    assert torch.equal(hidden, copy)


def test_an_unknown_vae_structure_falls_back_with_a_warning(vae, caplog):
    z = _latents((1, 4, 8, 8))
    original = vae.decoder.conv_norm_out
    vae.decoder.conv_norm_out = torch.nn.LayerNorm([32, 64, 64])  # not a GroupNorm
    try:
        with caplog.at_level(logging.WARNING, logger="library.sampling.vae_slices"), torch.no_grad():
            vae_memory.sliced_decode(vae, z, 4)
    except RuntimeError:
        pass  # the stand-in norm need not fit; only the fallback matters
    finally:
        vae.decoder.conv_norm_out = original
    assert "cannot be sliced" in caplog.text


def test_vae_slices_on_the_command_line_gives_the_same_image(tiny_models, tmp_path, monkeypatch):
    calls: list[int | None] = []
    real = Pipeline._decode_chunk

    def spy(self, latents):
        calls.append(self.vae_slices)
        return real(self, latents)

    monkeypatch.setattr(Pipeline, "_decode_chunk", spy)
    prompt = ["--prompt", "x --d 2", "--W", "96", "--H", "64"]
    assert run(tiny_models, tmp_path / "a", *prompt) == 0
    assert run(tiny_models, tmp_path / "b", *prompt, "--vae_slices", "4") == 0
    assert calls == [None, 4]
    assert np.abs(pixels(pngs(tmp_path / "a")[0]) - pixels(pngs(tmp_path / "b")[0])).max() <= 1

    src = make_source(tmp_path / "s.png", (64, 48))  # img2img: the encoder is sliced too
    assert run(tiny_models, tmp_path / "c", "--image_path", str(src), "--prompt", "x --d 2") == 0
    assert run(tiny_models, tmp_path / "d", "--image_path", str(src), "--prompt", "x --d 2", "--vae_slices", "3") == 0
    assert np.abs(pixels(pngs(tmp_path / "c")[0]) - pixels(pngs(tmp_path / "d")[0])).max() <= 1


def test_vae_batch_size_counts_and_fractions(tiny_models, tmp_path, monkeypatch):
    assert [vae_batch_size(v, 8) for v in (None, 0.5, 0.01, 3, 3.0)] == [8, 4, 1, 3, 3]
    sizes: list[int] = []
    real = Pipeline._decode_chunk

    def spy(self, latents):
        sizes.append(latents.shape[0])
        return real(self, latents)

    monkeypatch.setattr(Pipeline, "_decode_chunk", spy)
    common = ["--prompt", "x", "--seed", "1", "--images_per_prompt", "4", "--batch_size", "4", "--sequential_file_name",
              "--W", "64", "--H", "64"]
    assert run(tiny_models, tmp_path / "a", *common) == 0
    assert run(tiny_models, tmp_path / "b", *common, "--vae_batch_size", "0.5") == 0
    assert sizes == [4, 2, 2]
    for p, q in zip(pngs(tmp_path / "a"), pngs(tmp_path / "b")):
        assert np.abs(pixels(p) - pixels(q)).max() <= 1


def test_vae_tiling_decodes_large_images_in_tiles(tiny_models, tmp_path, monkeypatch):
    tiled: list[bool] = []
    real = Pipeline._decode_chunk

    def spy(self, latents):
        tiled.append(self.vae.use_tiling)
        return real(self, latents)

    monkeypatch.setattr(Pipeline, "_decode_chunk", spy)
    assert run(tiny_models, tmp_path / "o", "--prompt", "x", "--W", "128", "--H", "96", "--vae_tiling") == 0
    assert tiled == [True]
    assert pixels(pngs(tmp_path / "o")[0]).shape == (96, 128, 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--vae_slices", "0"], "--vae_slices 0: must be at least 1"),
        (["--vae_slices", "4", "--vae_tiling"], "--vae_slices and --vae_tiling exclude each other"),
    ],
)
def test_vae_option_mistakes(tiny_models, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        run(tiny_models, tmp_path / "o", "--prompt", "x", *extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err
