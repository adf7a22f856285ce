"""Full-size SD 1.5 / SD 2.x shaped checkpoints with random weights (slow: RUN_SLOW=1)."""

from __future__ import annotations

import time

import pytest
import torch

from library.models import load_model
from library.models.save import save_single_file
from tests.helpers import CLIP_L, OPENCLIP_H, SD15_UNET, SD2_UNET, SD_VAE


def _random_model(unet_cfg: dict, te_cfg: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**SD_VAE)
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    for module in (unet, vae, te):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
    return te, unet, vae


@pytest.mark.slow
@pytest.mark.parametrize("kind,unet_cfg,te_cfg", [("sd1", SD15_UNET, CLIP_L), ("sd2-v", SD2_UNET, OPENCLIP_H)])
def test_full_size_checkpoint_loads_with_the_standard_config(tmp_path, kind, unet_cfg, te_cfg):
    from safetensors.torch import load_file

    te, unet, vae = _random_model(unet_cfg, te_cfg)
    path = tmp_path / f"{kind}.safetensors"
    save_single_file(te, unet, vae, kind, path, dtype=torch.float16)
    del te, unet, vae

    start = time.perf_counter()
    tensors = load_file(str(path))
    read_only = time.perf_counter() - start
    del tensors
    start = time.perf_counter()
    model = load_model(str(path), dtype=torch.float16)
    ours = time.perf_counter() - start
    print(f"{kind}: safetensors alone {read_only:.2f} s, load_model {ours:.2f} s, ratio {ours / read_only:.2f}")

    assert model.kind.family == kind[:3] and model.kind.v_prediction == kind.endswith("-v")
    as_tuple = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    assert {k: as_tuple(model.unet.config[k]) for k in unet_cfg} == unet_cfg
    assert {k: getattr(model.text_encoder.config, k) for k in te_cfg} == te_cfg
    assert sum(p.numel() for p in model.unet.parameters()) > 800_000_000
