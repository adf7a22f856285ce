"""The VAE encoder loaded on first use (`library.models.lazy_encoder`): absent for txt2img,
loaded with the very weights of an eager load for every run that encodes, images unchanged."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from library.run import build
from library.models import checkpoint, load_model
from library.models import loader as loader_module
from library.models.lazy_encoder import LazyEncoder
from library.sampling.vae_slices import sliced_encode_moments
from tests.helpers import IMG2IMG_FAST, make_source, pixels, pngs, run

HIGHRES = ["--W", "128", "--H", "96", "--steps", "4", "--highres_fix_scale", "0.5", "--highres_fix_steps", "3",
           "--strength", "0.5", "--sampler", "ddim"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _images(seed: int = 3) -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def eager(tiny_models):
    return load_model(str(tiny_models["sd1"]))


def test_a_lazy_load_leaves_out_exactly_the_encoder(tiny_models, eager) -> None:
    lazy = load_model(str(tiny_models["sd1"]), vae_encoder="lazy")
    assert isinstance(lazy.vae.encoder, LazyEncoder) and not lazy.vae.encoder.loaded
    assert _count(lazy.vae) == _count(eager.vae) - _count(eager.vae.encoder) > 0
    kept = eager.vae.state_dict()
    assert {k: v for k, v in kept.items() if not k.startswith("encoder.")}.keys() == lazy.vae.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in lazy.vae.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_encode_loads_the_weights_of_an_eager_load(tiny_models, dtype) -> None:
    eager = load_model(str(tiny_models["sd1"]), dtype=dtype)
    lazy = load_model(str(tiny_models["sd1"]), dtype=dtype, vae_encoder="lazy")
    x = _images().to(dtype)
    with torch.no_grad():
        want = eager.vae.encode(x).latent_dist.parameters
        got = lazy.vae.encode(x).latent_dist.parameters
    assert torch.equal(got, want)
    assert type(lazy.vae.encoder) is type(eager.vae.encoder)  # the stand-in replaced itself
    assert not lazy.vae.encoder.training and not any(p.requires_grad for p in lazy.vae.encoder.parameters())
    state = eager.vae.state_dict()
    assert lazy.vae.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in lazy.vae.state_dict().items())


def test_a_dtype_switch_before_first_use_rounds_as_an_eager_load(tiny_models) -> None:
    """The NaN guard turns a half VAE to fp32: the encoder then has the half weights, in fp32."""
    eager = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16)
    lazy = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16, vae_encoder="lazy")
    full = load_model(str(tiny_models["sd1"]))  # fp32 file read in fp32
    for model in (eager, lazy):
        model.vae.to(torch.float32)
    assert lazy.vae.encoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(lazy.vae.encoder.conv_in.weight, eager.vae.encoder.conv_in.weight)
    assert not torch.equal(lazy.vae.encoder.conv_in.weight, full.vae.encoder.conv_in.weight)


def test_probes_for_features_do_not_load_it(tiny_models) -> None:
    vae = load_model(str(tiny_models["sd1"]), vae_encoder="lazy").vae
    stand_in = vae.encoder
    assert not hasattr(stand_in, "gradient_checkpointing") and not hasattr(stand_in, "set_processor")
    vae.enable_gradient_checkpointing()  # guidance does this; it walks every module's attributes
    _ = vae.attn_processors
    assert vae.encoder is stand_in and not stand_in.loaded
    with pytest.raises(AttributeError):
        stand_in.no_such_layer  # noqa: B018
    assert len(stand_in.down_blocks) == len(vae.decoder.up_blocks)  # a layer by name loads it
    assert stand_in.loaded and vae.encoder is not stand_in


def test_sliced_encoding_loads_it(tiny_models, eager) -> None:
    lazy = load_model(str(tiny_models["sd1"]), vae_encoder="lazy")
    with torch.no_grad():
        assert torch.equal(sliced_encode_moments(lazy.vae, _images(), 2), sliced_encode_moments(eager.vae, _images(), 2))


def test_a_separate_vae_file_is_lazy_too(tiny_models) -> None:
    options = {"vae": str(tiny_models["vae"])}
    eager = load_model(str(tiny_models["sd1"]), **options)
    lazy = load_model(str(tiny_models["sd1"]), vae_encoder="lazy", **options)
    assert isinstance(lazy.vae.encoder, LazyEncoder)
    with torch.no_grad():
        assert torch.equal(lazy.vae.encode(_images()).latent_dist.mean, eager.vae.encode(_images()).latent_dist.mean)


def test_a_diffusers_folder_loads_it(tiny_models) -> None:
    lazy = load_model(str(tiny_models["sd1-diffusers"]), vae_encoder="lazy")
    assert not isinstance(lazy.vae.encoder, LazyEncoder) and _count(lazy.vae.encoder) > 0


def test_the_encoder_pages_are_not_mapped_in(tiny_models, monkeypatch) -> None:
    """Weights kept as stored are paged in from a background thread; the encoder's are not."""
    paged: list[int] = []
    real = checkpoint.paging_in

    @contextlib.contextmanager
    def recording(tensors):
        tensors = list(tensors)
        paged.append(sum(t.nbytes for t in tensors))
        with real(tensors):
            yield

    monkeypatch.setattr(loader_module.checkpoint, "paging_in", recording)
    eager = load_model(str(tiny_models["sd1"]))  # the tiny file is fp32: every weight kept as stored
    load_model(str(tiny_models["sd1"]), vae_encoder="lazy")
    encoder_bytes = sum(p.nbytes for p in eager.vae.encoder.parameters())
    assert paged[0] - paged[1] == encoder_bytes > 0


# --- through the command ------------------------------------------------------------------------


@pytest.fixture
def loaded(monkeypatch):
    """The models of the runs in this test; `loaded.eager = True` loads them the old way."""

    class Loads(list):
        eager = False

    loads = Loads()
    real = build.load_model

    def recording(*args, **kwargs):
        if loads.eager:
            kwargs["vae_encoder"] = "eager"
        loads.append(real(*args, **kwargs))
        return loads[-1]

    monkeypatch.setattr(build, "load_model", recording)
    return loads


def _encoder_loaded(model) -> bool:
    return not isinstance(model.vae.encoder, LazyEncoder)


@pytest.mark.parametrize("case", ["txt2img", "img2img", "inpainting", "highres", "highres_latents"])
def test_runs_load_it_only_when_they_encode_and_images_do_not_change(tiny_models, tmp_path, loaded, case) -> None:
    src = make_source(tmp_path / "src.png", (64, 64))
    mask = make_source(tmp_path / "mask.png", (64, 64), seed=5, mode="L")
    extra = {
        "txt2img": ["--prompt", "a house --d 4"],
        "img2img": [*IMG2IMG_FAST, "--prompt", "a house --d 4", "--image_path", str(src), "--strength", "0.6"],
        "inpainting": [*IMG2IMG_FAST, "--prompt", "a house --d 4", "--image_path", str(src), "--mask_path", str(mask)],
        "highres": [*HIGHRES, "--prompt", "a house --d 4"],
        "highres_latents": [*HIGHRES, "--prompt", "a house --d 4", "--highres_fix_latents_upscaling"],
    }[case]
    assert run(tiny_models, tmp_path / "lazy", *extra) == 0
    loaded.eager = True
    assert run(tiny_models, tmp_path / "eager", *extra) == 0
    lazy_model, eager_model = loaded
    assert _encoder_loaded(lazy_model) == (case in ("img2img", "inpainting", "highres"))
    assert isinstance(lazy_model.vae.encoder, LazyEncoder) or not lazy_model.vae.encoder.training
    assert _encoder_loaded(eager_model)
    lazy_files, eager_files = pngs(tmp_path / "lazy"), pngs(tmp_path / "eager")
    assert len(lazy_files) == len(eager_files) >= 1
    for a, b in zip(lazy_files, eager_files):
        assert np.array_equal(pixels(a), pixels(b)), (a.name, b.name)
