"""--compile: the networks compile in place, and fall back uncompiled with one clear warning."""

from __future__ import annotations

import logging

import pytest
import torch

from library.records.jobs import Job
from library.models import compiling, load_model
from tests.helpers import make_pipeline


def test_no_compiler_means_a_warning_and_no_compile(tiny_models, monkeypatch, caplog) -> None:
    model = load_model(str(tiny_models["sd1"]))
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert not compiling.compile_networks(model.unet, model.vae, torch.device("cpu"))
    assert "C++ compiler" in caplog.text and model.unet._compiled_call_impl is None


def test_a_failing_compile_runs_uncompiled_with_one_warning(tiny_models, monkeypatch, caplog) -> None:
    model = load_model(str(tiny_models["sd1"]))
    pipeline = make_pipeline(model, "ddim")
    jobs = [Job("a cube", "", seed=3, width=64, height=64, steps=2, scale=7.0)]
    expected = pipeline.decode(pipeline.latents(jobs), 1)

    def broken_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("inductor exploded\nmore lines")
        module._compiled_call_impl = fail

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    monkeypatch.setattr(compiling, "compile_unavailable", lambda device: None)
    with caplog.at_level(logging.WARNING):
        assert compiling.compile_networks(model.unet, model.vae, torch.device("cpu"))
        got = pipeline.decode(pipeline.latents(jobs), 1)
    assert torch.equal(got, expected)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("inductor exploded" in w and "uncompiled" in w for w in warnings)


def test_cli_accepts_compile() -> None:
    from library.cli.parser import parse_args

    assert parse_args(["--prompt", "x", "--compile"]).compile and not parse_args(["--prompt", "x"]).compile


@pytest.mark.slow
def test_compiled_images_are_within_one_level(tiny_models) -> None:
    """The real thing (minutes on a small CPU): compiled U-Net and VAE decoder, same images."""
    model = load_model(str(tiny_models["sd1"]))
    pipeline = make_pipeline(model, "ddim")
    jobs = [Job("a red cube", "", seed=3, width=64, height=64, steps=3, scale=7.0)]
    expected = pipeline.decode(pipeline.latents(jobs), 1)
    assert compiling.compile_networks(model.unet, model.vae, torch.device("cpu"))
    got = pipeline.decode(pipeline.latents(jobs), 1)
    assert (got - expected).abs().max().item() / 2 <= 1 / 255
