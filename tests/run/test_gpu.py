"""What only a CUDA GPU can show: half-precision generation there, the VAE's NaN guard in fp16,
and a torchrun run with one GPU. Marked `gpu`: skipped where no CUDA device is (conftest.py);
`python -m tools.gpu_check` runs them on a lent GPU together with the benchmarks.

Every run draws its noise on the CPU (`--noise_device cpu`), so the GPU's images can be set
against the CPU's fp32 image of the same seed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from library.models import load_model
from library.sampling.pipeline import Pipeline
from library.text.encoder import PromptEncoder
from tests.helpers import ROOT, pixels, pngs, run

pytestmark = pytest.mark.gpu

ON_GPU = ["--device", "cuda", "--noise_device", "cpu"]


@pytest.fixture(scope="module")
def cpu_fp32(tiny_models, tmp_path_factory):
    """The CPU's fp32 image of seed 5: what every GPU run is compared with."""
    out = tmp_path_factory.mktemp("cpu-fp32")
    assert run(tiny_models, out, "--prompt", "a red cat --d 5", "--device", "cpu", "--noise_device", "cpu") == 0
    return pixels(pngs(out)[0])


@pytest.mark.parametrize("flags", [["--fp16"], ["--bf16"], ["--fp16", "--no_half_vae"], ["--bf16", "--opt_channels_last"]])
def test_half_precision_on_the_gpu_makes_the_cpu_image(tiny_models, tmp_path, cpu_fp32, flags):
    """fp16 / bf16 on the GPU: the same picture as fp32 on the CPU (half-precision rounding
    only), and the same seed twice gives the same file."""
    for name in ("a", "b"):
        assert run(tiny_models, tmp_path / name, "--prompt", "a red cat --d 5", *ON_GPU, *flags) == 0
    a, b = pixels(pngs(tmp_path / "a")[0]), pixels(pngs(tmp_path / "b")[0])
    assert np.abs(a - cpu_fp32).mean() < 8
    assert np.abs(a - b).max() <= 1  # cuDNN may pick other kernels run to run: one level at most


def test_fp16_vae_nan_on_the_gpu_falls_back_to_fp32(tiny_models, caplog):
    """A half-precision VAE that makes NaN on the GPU is switched to fp32 and decodes again."""
    cuda = torch.device("cuda")
    model = load_model(str(tiny_models["sd1"]), dtype=torch.float16, device=cuda)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=model.kind.default_clip_skip)
    pipeline = Pipeline(model.unet, model.vae, encoder, "ddim", model.kind.v_prediction, cuda, torch.float16,
                        torch.device("cpu"), progress=False)
    real_decode = model.vae.decode

    def nan_in_half(z, *a, **k):
        out = real_decode(z, *a, **k)
        if z.dtype != torch.float32:
            out.sample.fill_(float("nan"))
        return out

    model.vae.decode = nan_in_half
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16, device="cuda")
    with caplog.at_level(logging.WARNING, logger="library.sampling.pipeline"):
        images = pipeline.decode(latents, 1)
    assert torch.isfinite(images).all() and model.vae.dtype == torch.float32
    assert [r.getMessage() for r in caplog.records if r.name == "library.sampling.pipeline"] == [
        "the half-precision VAE produced NaN; switching the VAE to fp32 (--no_half_vae)"]


def test_torchrun_with_one_gpu_writes_the_files_of_one_process(tiny_models, tmp_path):
    """`torchrun --nproc_per_node 1` on the GPU: the files (names without their time, pixels)
    of a plain process on the GPU."""
    args = ["--ckpt", str(tiny_models["sd1"]), "--prompt", "a red cat --d 5", "--images_per_prompt", "2",
            "--W", "64", "--H", "64", "--steps", "3", "--fp16", *ON_GPU]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    plain = subprocess.run([sys.executable, "gen_img.py", *args, "--outdir", str(tmp_path / "plain")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    split = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                            "gen_img.py", *args, "--outdir", str(tmp_path / "torchrun")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr
    ours, theirs = pngs(tmp_path / "torchrun"), pngs(tmp_path / "plain")
    assert [p.name.split("_", 2)[2] for p in ours] == [p.name.split("_", 2)[2] for p in theirs]
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
