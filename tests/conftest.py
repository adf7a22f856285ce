"""Shared fixtures: the tiny models, built once per test session in a temporary folder."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# model hashes are remembered (library.images.hashes): in a throw-away folder, not the user's cache
os.environ.setdefault("SDGEN_CACHE_DIR", tempfile.mkdtemp(prefix="sdgen-test-cache-"))


def pytest_collection_modifyitems(config, items):
    """Slow tests (full-size models) run only with RUN_SLOW=1; GPU tests only where torch sees CUDA."""
    slow = os.environ.get("RUN_SLOW") != "1"
    skip_slow = pytest.mark.skip(reason="full-size model test; set RUN_SLOW=1 to run")
    gpu = any("gpu" in item.keywords for item in items) and not _cuda_available()
    skip_gpu = pytest.mark.skip(reason="GPU test; no CUDA device here (python -m tools.gpu_check runs them on one)")
    for item in items:
        if slow and "slow" in item.keywords:
            item.add_marker(skip_slow)
        if gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny models: 'sd1', 'sd1-diffusers', 'sd2', ..., 'vae'."""
    from library.models.tiny_files import make_tiny_models
    from tools.make_tiny_model import write_tiny_extras

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("tiny-models")
    return {**make_tiny_models(folder), **write_tiny_extras(folder)}


@pytest.fixture(scope="module")
def sd1(tiny_models):
    """The tiny SD1 model, loaded once per test module (tests may patch it; the next module gets a fresh one)."""
    from library.models import load_model

    return load_model(str(tiny_models["sd1"]))


# Tiny models run fastest on one thread, and parallel test sessions must not oversubscribe
# the cores (OpenMP spin-waits make a 5 ms U-Net call take a second under contention).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """Commands run in-process (gen_img, tools) quiet some loggers; undo that after each test."""
    names = ["", "library", "diffusers", "transformers", "networks", "gen_img", "tools"]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def call_log(monkeypatch):
    """Every `Pipeline.latents` call of a run: size, steps, seeds, strength, steps actually run."""
    from library.sampling.patches import FixedFeature
    from library.sampling.pipeline import Pipeline
    from tests.helpers import StepRecorder

    log: list[dict] = []
    real = Pipeline.latents

    def latents(self, jobs, init=None):
        entry = {"size": (jobs[0].width, jobs[0].height), "steps": jobs[0].steps, "seeds": [j.seed for j in jobs],
                 "strength": None if init is None else init.strength, "ran": 0}
        recorder = FixedFeature(StepRecorder(lambda i, t: entry.__setitem__("ran", entry["ran"] + 1)))
        self.patches.add(recorder)
        try:
            return real(self, jobs, init)
        finally:
            self.patches.features.remove(recorder)
            log.append(entry)

    monkeypatch.setattr(Pipeline, "latents", latents)
    return log
