"""The full-size SDXL-shaped random checkpoint (slow: RUN_SLOW=1; ~7 GB written once into the
benchmarks' cache folder, outside the repository)."""

from __future__ import annotations

import pytest
import torch

from library.models import load_model


@pytest.mark.slow
def test_full_size_sdxl_decodes_finite_pixels_in_fp16_and_bf16_runs():
    from tools.bench.common import DEFAULT_CACHE
    from tools.bench.sdxl import full_size_sdxl_checkpoint

    path = full_size_sdxl_checkpoint(DEFAULT_CACHE)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    for dtype, vae_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model = load_model(str(path), dtype=dtype)
        assert model.kind.family == "sdxl" and model.unet.dtype == dtype and model.vae.dtype == vae_dtype
        assert model.unet.config.projection_class_embeddings_input_dim == 2816
        with torch.no_grad():
            image = model.vae.decode(latents.to(vae_dtype) / model.vae.config.scaling_factor).sample.float()
        assert image.shape == (1, 3, 512, 512)
        assert torch.isfinite(image).all()
        assert image.std() > 0  # not a flat (black) image
        del model
