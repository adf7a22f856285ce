"""Every per-batch effect of a feature is entered on the patch owner's `ExitStack` and undone when
the batch ends, also when the batch fails: the models, their hooks and flags, and the networks'
multipliers are exactly as before, and the next batch gives the latents a fresh process gives."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from library.features.attention_couple import CouplePatch
from library.features.controlnet import BatchControl, ControlNets
from library.features.gradual_latent import GrowLatents
from library.features.guidance import GuidedBatch, GuidedGeneration
from library.features.lora import NetworkLayers
from library.prompts.seeds import SeedSource
from library.prompts.sources import Line
from library.sampling.patches import Patch
from tests.helpers import ROOT, build_run

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _state(models: dict[str, torch.nn.Module], networks) -> dict:
    """Per module: type, attention processor, hooks, gradient checkpointing flag, and each
    parameter's storage, `requires_grad` and value; per network: its multiplier and mode."""
    state: dict = {}
    for label, model in models.items():
        for name, module in model.named_modules():
            processor = getattr(module, "processor", None)
            hooks = tuple(tuple(getattr(module, attr).keys()) for attr in _HOOK_DICTS)
            params = tuple((k, v.data_ptr(), v.requires_grad, v.detach().clone())
                           for k, v in module.named_parameters(recurse=False))
            state[label, name] = (type(module), id(processor), type(processor), hooks,
                                  getattr(module, "gradient_checkpointing", None), params)
    for index, network in enumerate(networks.loaded):
        state["network", index] = (network.multiplier, network.mode)
    return state


def _differences(before: dict, after: dict) -> list:
    """The keys whose entries differ (tensors compared exactly)."""

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, tuple):
            return isinstance(b, tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    return [key for key in before.keys() | after.keys() if key not in before or key not in after
            or not same(before[key], after[key])]


class Fails(Exception):
    pass


class Inject(Patch):
    """Records what the batch has installed, and raises at the last step's `after_step` when asked."""

    def __init__(self, watch) -> None:
        self.watch, self.fail = watch, False
        self.during: dict | None = None
        self.patches: list[type] = []
        self.sizes: list[tuple[int, int]] = []

    def for_batch(self, batch):
        return self

    def install(self, stack, run):
        self.patches = [type(p) for p in run.patches]

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.sizes.append(tuple(sample.shape[-2:]))
        return None

    def after_step(self, ctx, latents):
        if ctx.last:
            self.during = self.watch()
            if self.fail:
                raise Fails("raised inside the batch")
        return latents


def _guide(path) -> str:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
    return str(path)


def _built(argv: list[str]):
    """Model, networks, pipeline and the prompt's jobs, built as `gen_img` builds them."""
    run = build_run(argv)
    model, networks, pipeline, options = run.model, run.networks, run.pipeline, run.options
    jobs = list(run.runner.jobs([Line(options.rounds.prompt, "--prompt")], SeedSource(3, True), None))
    return model, networks, pipeline, jobs


def test_a_failing_batch_with_every_effect_leaves_everything_as_it_was(tiny_models, tmp_path):
    """ControlNet + Gradual Latent + a pre-calculated LoRA at --am 0.6 + CLIP guidance + Attention
    Couple (a prompt of two parts; no region mask: with one, networks are regional LoRA and run
    un-merged, never pre-calculated) in one batch. During the batch each effect is on (the hint
    embedding's hook, the VAE's gradient checkpointing, the multiplier 0.6, the attention
    processors); after it, and after the same batch raising at its last step, every module,
    hook, processor, `requires_grad`, checkpointing flag, weight and multiplier is as before,
    and the next batch's latents equal those of a fresh process."""
    argv = ["--ckpt", str(tiny_models["sd1"]), "--W", "96", "--H", "96", "--steps", "6", "--sampler", "euler_a",
            "--prompt", "a cat AND a dog --am 0.6", "--outdir", str(tmp_path / "out"),
            "--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"]), "--network_pre_calc",
            "--control_net_models", str(tiny_models["controlnet-sd1"]),
            "--guide_image_path", _guide(tmp_path / "g.png"),
            "--gradual_latent_timesteps", "900", "--gradual_latent_every_n_steps", "1",
            "--clip_guidance_scale", "100", "--clip_model", str(tiny_models["clip"])]
    model, networks, pipeline, jobs = _built(argv)
    controlnet = next(f for f in pipeline.features if isinstance(f, ControlNets)).units[0].model
    clip = next(f for f in pipeline.features if isinstance(f, GuidedGeneration)).clip.model
    models = {"unet": model.unet, "text_encoder": model.text_encoder, "vae": model.vae, "controlnet": controlnet,
              "clip": clip}
    inject = Inject(lambda: _state(models, networks))
    pipeline.patches.add(inject)
    before = _state(models, networks)
    assert not model.vae.is_gradient_checkpointing and networks.loaded[0].mode == "precalc"

    first = pipeline.latents(jobs)
    assert {BatchControl, GrowLatents, NetworkLayers, GuidedBatch, CouplePatch} <= set(inject.patches)
    assert inject.sizes[0] != inject.sizes[-1]  # Gradual Latent grew the latents
    changed = {key[:2] if key[0] != "network" else key for key in _differences(before, inject.during)}
    assert ("network", 0) in changed and inject.during["network", 0][0] == 0.6
    assert ("controlnet", "controlnet_cond_embedding") in changed  # the hint-size hook
    assert inject.during["vae", "decoder"][4] is True  # gradient checkpointing
    assert any(label == "unet" for label, _ in changed)  # processors, LoRA weights
    assert _differences(before, _state(models, networks)) == []

    inject.fail = True
    with pytest.raises(Fails):
        pipeline.latents(jobs)
    assert _differences(before, _state(models, networks)) == []

    inject.fail = False
    again = pipeline.latents(jobs)
    fresh = _latents_of_a_fresh_process(argv, tmp_path / "fresh.pt")
    assert torch.equal(again, fresh) and torch.equal(first, fresh)


_FRESH = """import sys, torch
torch.set_num_threads(1)  # as the tests' process: the same kernels
from library.prompts.seeds import SeedSource
from library.prompts.sources import Line
from tests.helpers import ROOT, build_run
run = build_run(sys.argv[2:])
jobs = list(run.runner.jobs([Line(run.options.rounds.prompt, "--prompt")], SeedSource(3, True), None))
torch.save(run.pipeline.latents(jobs), sys.argv[1])
"""


def _latents_of_a_fresh_process(argv: list[str], path) -> torch.Tensor:
    """The batch's latents made by a new Python process with the same command line."""
    subprocess.run([sys.executable, "-c", _FRESH, str(path), *argv], cwd=ROOT, check=True, capture_output=True)
    return torch.load(path)
