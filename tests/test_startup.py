"""Start of a gen_img process (`library.startup`, `library.models.prefetch`): the checkpoint
read ahead gives the very weights of a plain load."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library import startup
from library.errors import UserError
from library.models import load_model, prefetch
from library.models.lazy_encoder import LazyEncoder
from tests.helpers import pixels, pngs, run

def _states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(model, part).state_dict() for part in ("unet", "vae", "text_encoder")}


def _same(a, b) -> bool:
    return all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) and a[p][k].dtype == b[p][k].dtype
                                                  for k in a[p]) for p in a)


@pytest.mark.parametrize("dtype, vae_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32)])
def test_a_prefetched_load_has_the_weights_of_a_plain_load(tiny_models, dtype, vae_dtype) -> None:
    path = Path(tiny_models["sd1"])
    plain = load_model(str(path), dtype=dtype, vae_dtype=vae_dtype, vae_encoder="lazy")
    assert prefetch.start(path, dtype, vae_dtype, lazy_encoder=True)
    ready = prefetch.read_cast(prefetch.Request.of(path, dtype, vae_dtype, True))
    assert {t.dtype for k, t in ready.items() if k.startswith("model.diffusion_model.")} == {dtype}
    assert {t.dtype for k, t in ready.items() if k.startswith("first_stage_model.decoder.")} == {vae_dtype}
    assert {t.dtype for k, t in ready.items() if k.startswith("first_stage_model.encoder.")} == {torch.float32}
    fast = load_model(str(path), dtype=dtype, vae_dtype=vae_dtype, vae_encoder="lazy")
    assert prefetch.take(path, dtype, vae_dtype, True) is None  # used up by the load
    assert isinstance(fast.vae.encoder, LazyEncoder)
    assert _same(_states(plain), _states(fast))


def test_only_an_equal_request_uses_it(tiny_models, monkeypatch) -> None:
    path = Path(tiny_models["sd1"])
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    assert prefetch.take(path, torch.bfloat16, torch.bfloat16, True) is None
    assert prefetch.take(path, torch.float32, torch.float32, True) is None  # the slot was emptied
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    assert prefetch.take(path, torch.float32, torch.float32, False) is None  # an eager encoder is another load
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    state = prefetch.take(path, torch.float32, torch.float32, True)
    assert state is not None and state.keys() == load_file(str(path)).keys()
    assert not prefetch.start(Path(tiny_models["sd1-diffusers"]), torch.float32, torch.float32, True)


def test_a_changed_file_is_read_again(tiny_models, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(Path(tiny_models["sd1"]).read_bytes())
    prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    os.utime(path, ns=(1, 1))  # same bytes, another modification time
    assert prefetch.take(path, torch.float32, torch.float32, True) is None


def test_a_damaged_file_fails_in_the_load_as_before(tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert prefetch.start(path, torch.float32, torch.float32, lazy_encoder=True)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(str(path), vae_encoder="lazy")


def test_the_last_sd2_text_block_is_left_as_stored(tiny_models) -> None:
    path = Path(tiny_models["sd2"])
    ready = prefetch.read_cast(prefetch.Request.of(path, torch.bfloat16, torch.bfloat16, True))
    blocks = sorted({int(k.split("resblocks.")[1].split(".")[0]) for k in ready if "resblocks." in k})
    last = f"cond_stage_model.model.transformer.resblocks.{blocks[-1]}."
    assert {t.dtype for k, t in ready.items() if k.startswith(last)} == {torch.float32}
    first = "cond_stage_model.model.transformer.resblocks.0."
    assert {t.dtype for k, t in ready.items() if k.startswith(first)} == {torch.bfloat16}


def test_a_run_uses_the_prefetch_and_its_images_do_not_change(tiny_models, tmp_path, monkeypatch) -> None:
    used: list[bool] = []
    real_take = prefetch.take

    def spying(*args, **kwargs):
        state = real_take(*args, **kwargs)
        used.append(state is not None)
        return state

    monkeypatch.setattr(prefetch, "take", spying)
    common = ["--prompt", "a house --d 7", "--bf16"]
    assert run(tiny_models, tmp_path / "ahead", *common) == 0
    monkeypatch.setattr(startup, "prefetch_checkpoint", lambda options: False)
    assert run(tiny_models, tmp_path / "plain", *common) == 0
    assert used == [True, False]
    (a,), (b,) = pngs(tmp_path / "ahead"), pngs(tmp_path / "plain")
    assert np.array_equal(pixels(a), pixels(b))
