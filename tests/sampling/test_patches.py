"""The patch owner: every patch point is called with the right context and its change reaches
the output; a batch with every feature leaves the models exactly as they were."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.cli.parser import parse_options
from library.models import load_model
from library.records.jobs import Job
from library.run import build
from library.sampling.patches import BatchLayout, FixedFeature, Patch, StepContext
from library.sampling.schedulers import make_scheduler
from tests.helpers import ROOT, build_run, make_pipeline


def _latents(model, patch: Patch | None, sampler: str = "euler", scale: float = 5.0) -> torch.Tensor:
    pipeline = make_pipeline(model, sampler)
    if patch is not None:
        pipeline.patches.add(FixedFeature(patch))
    job = Job("a cat", "blur", seed=5, width=64, height=64, steps=3, scale=scale)
    return pipeline.latents([job, Job("a dog", "blur", seed=6, width=64, height=64, steps=3, scale=scale)])


def residuals(skips: int, value: float) -> dict:
    """ControlNet-style U-Net arguments that add `value` to every skip and the mid block."""
    return {"down_block_additional_residuals": tuple(torch.tensor(value) for _ in range(skips)),
            "mid_block_additional_residual": torch.tensor(value)}


class Residuals(Patch):
    def __init__(self, value: float) -> None:
        self.value = value

    def unet_kwargs(self, ctx, sample, timestep, cond):
        return residuals(4, self.value)


def test_unet_arguments_of_two_producers_add_up(sd1):
    pipeline = make_pipeline(sd1, "ddim")
    pipeline.patches.add(FixedFeature(Residuals(0.1)))
    pipeline.patches.add(FixedFeature(Residuals(0.2)))
    job = Job("a cat", "", seed=5, width=64, height=64, steps=3, scale=5.0)
    both = pipeline.latents([job])
    one = make_pipeline(sd1, "ddim")
    one.patches.add(FixedFeature(Residuals(0.1 + 0.2)))
    assert torch.allclose(both, one.latents([job]), atol=1e-5)
    assert (both - make_pipeline(sd1, "ddim").latents([job])).abs().max() > 1e-3


class Recorder(Patch):
    """Records (point, context) and applies `change` at one named point."""

    def __init__(self, point: str, skips: int = 4) -> None:
        self.point, self.skips = point, skips
        self.seen: list[tuple] = []

    def _note(self, name: str, ctx: StepContext | None, *detail) -> bool:
        self.seen.append((name, ctx, *detail))
        return name == self.point

    def start(self, latents):
        return latents + 0.5 if self._note("start", None) else latents

    def scale_model_input(self, ctx, sample, default):
        out = default(sample)
        return out * 1.1 if self._note("scale_model_input", ctx, tuple(sample.shape)) else out

    def unet_kwargs(self, ctx, sample, timestep, cond):
        if not self._note("unet_kwargs", ctx, tuple(sample.shape), int(timestep)):
            return None
        return residuals(self.skips, 0.3)

    def down_block_input(self, ctx, depth, hidden):
        return hidden * 1.1 if self._note("down_block_input", ctx, depth, tuple(hidden.shape[-2:])) else hidden

    def before_skip_concat(self, ctx, up_index, layer, hidden, skip):
        hit = self._note("before_skip_concat", ctx, up_index, layer, tuple(hidden.shape[-2:]), tuple(skip.shape[-2:]))
        return hidden * 1.1 if hit else hidden

    def cross_attention_states(self, ctx, layer, states, cond):
        return states * 2 if self._note("cross_attention_states", ctx, layer, tuple(states.shape)) else states

    def cross_attention_output(self, ctx, layer, hidden, states, attend):
        out = attend(states)
        return out * 1.5 if self._note("cross_attention_output", ctx, layer) else out

    def after_cfg(self, ctx, latents, eps):
        return eps * 0.9 if self._note("after_cfg", ctx, tuple(eps.shape)) else eps

    def guide(self, ctx, latents, eps, unet):
        return (latents, eps * 0.9) if self._note("guide", ctx, tuple(latents.shape), tuple(eps.shape)) else \
            (latents, eps)

    def scheduler_step(self, ctx, eps, latents, default):
        out = default(eps, latents)
        return out + 0.01 if self._note("scheduler_step", ctx) else out

    def after_step(self, ctx, latents):
        return latents * 0.99 if self._note("after_step", ctx) else latents


POINTS = ["start", "scale_model_input", "unet_kwargs", "down_block_input", "before_skip_concat", "cross_attention_states",
          "cross_attention_output", "after_cfg", "guide", "scheduler_step", "after_step"]


def test_every_point_sees_the_context_of_its_call_and_passes_through_unchanged(sd1):
    plain = _latents(sd1, None)
    recorder = Recorder(point="none")
    assert torch.equal(_latents(sd1, recorder), plain)  # pass-through defaults change nothing
    contexts = {e[1] for e in recorder.seen if e[1] is not None}
    layout = BatchLayout(images=2, copies=2, latent_height=8, latent_width=8)
    scheduler = make_scheduler("euler", False)
    scheduler.set_timesteps(3)
    got = sorted((c.step, c.steps, c.timestep, c.sigma, c.layout) for c in contexts)
    assert got == [(i, 3, int(t), float(scheduler.sigmas[i]), layout) for i, t in enumerate(scheduler.timesteps)]
    steps_seen = {e[0]: [] for e in recorder.seen}
    for entry in recorder.seen:
        steps_seen[entry[0]].append(entry)
    assert set(steps_seen) == set(POINTS)
    assert [e[2:] for e in steps_seen["unet_kwargs"]] == [((4, 4, 8, 8), c.timestep) for c in sorted(
        contexts, key=lambda c: c.step)]
    # the tiny U-Net: 2 down blocks of one layer (8 -> 4), 2 up blocks of two; skips of the same size
    assert {e[2:] for e in steps_seen["down_block_input"]} == {(0, (8, 8)), (1, (4, 4))}
    assert {e[2:] for e in steps_seen["before_skip_concat"]} == {
        (0, 0, (4, 4), (4, 4)), (0, 1, (4, 4), (4, 4)), (1, 0, (8, 8), (8, 8)), (1, 1, (8, 8), (8, 8))}
    assert {e[2] for e in steps_seen["cross_attention_states"]} == {"IN01", "MID", "OUT02", "OUT03"}
    assert {e[3] for e in steps_seen["cross_attention_states"]} == {(4, 77, 32)}
    assert len(steps_seen["after_step"]) == 3 and len(steps_seen["start"]) == 1


@pytest.mark.parametrize("point", POINTS)
def test_each_point_changes_the_output(sd1, point):
    plain = _latents(sd1, None)
    changed = _latents(sd1, Recorder(point))
    assert (changed - plain).abs().max() > 1e-4, point


class RowCalls(Patch):
    """At `guide`, runs the U-Net on some rows and keeps what it saw and got."""

    def __init__(self, rows: tuple[int, ...]) -> None:
        self.rows, self.calls, self.contexts = rows, [], []

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.contexts.append((ctx.rows, tuple(sample.shape), tuple(cond.states.shape)))
        return None

    def guide(self, ctx, latents, eps, unet):
        sample = torch.cat([latents] * ctx.layout.copies)[list(self.rows)]
        with torch.enable_grad():
            x = sample.clone().requires_grad_(True)
            out = unet(x, self.rows)
            (grad,) = torch.autograd.grad(out.sum(), x)
        self.calls.append((ctx.step, out.detach(), grad))
        return latents, eps


def test_guide_runs_the_unet_on_chosen_rows_as_the_loop_does(tiny_models, sd1, tmp_path):
    """`unet(sample, rows)` at `guide`: the rows' text states, ControlNet's hints for those rows,
    gradients when enabled; its output equals those rows of the loop's own call."""
    from library.features.controlnet import ControlNets, ControlUnit, Prep
    from library.models.controlnet import load_controlnet

    net = load_controlnet(str(tiny_models["controlnet-sd1"]), sd1.unet, torch.float32, torch.device("cpu"))
    full_rows = []

    class Full(Patch):
        def guide(self, ctx, latents, eps, unet):
            full_rows.append(unet(torch.cat([latents] * 2), range(4)).detach())
            return latents, eps

    rows = RowCalls((3, 1))
    pipeline = make_pipeline(sd1, "ddim")
    pipeline.patches.add(ControlNets([ControlUnit(net, "tiny", Prep("none"), 1.0, 1.0)]))
    pipeline.patches.add(FixedFeature(Full()))
    pipeline.patches.add(FixedFeature(rows))
    guide = str(tmp_path / "guide.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(guide)
    jobs = [Job(p, "blur", seed=s, width=64, height=64, steps=2, scale=5.0, guide_image=guide)
            for p, s in (("a cat", 5), ("a dog", 6))]
    plain = make_pipeline(sd1, "ddim")
    plain.patches.add(ControlNets([ControlUnit(net, "tiny", Prep("none"), 1.0, 1.0)]))
    assert torch.equal(pipeline.latents(jobs), plain.latents(jobs))  # a guide patch that changes nothing
    assert [c[0] for c in rows.contexts] == [None, (0, 1, 2, 3), (3, 1)] * 2
    assert rows.contexts[2][1:] == ((2, 4, 8, 8), (2, 77, 32))
    for (_step, out, grad), full in zip(rows.calls, full_rows):
        assert torch.allclose(out, full[[3, 1]], atol=1e-5)
        assert grad.abs().sum() > 0


def _snapshot(*models: torch.nn.Module) -> list:
    """Every module's type, processor, parameters and hooks (the dicts torch keeps them in)."""
    state = []
    for m, model in enumerate(models):
        for name, module in model.named_modules():
            hooks = tuple(
                tuple(getattr(module, attr).keys())
                for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
            )
            processor = getattr(module, "processor", None)
            params = tuple((k, v.data_ptr(), v._version) for k, v in module.named_parameters(recurse=False))
            state.append((m, name, type(module), id(processor), type(processor), hooks, params))
    return state


def _feature_files(tiny_models, tmp_path):
    """An XTI file whose layers hold scaled "cat" vectors, a random source and guide image, and a
    mask whose right half is white (64x64)."""
    from library.text.embeddings import write_xti

    model = load_model(str(tiny_models["sd1"]))
    ids = model.tokenizer("cat", add_special_tokens=False).input_ids
    cat = model.text_encoder.get_input_embeddings().weight[ids].detach()
    xti = write_xti(tmp_path / "xcat.safetensors",
                    {n: cat * (1 + 0.1 * i) for i, n in enumerate(("IN01", "MID", "OUT02", "OUT03"))})
    source, mask, guide = tmp_path / "source.png", tmp_path / "mask.png", tmp_path / "guide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(guide)
    mask_pixels = np.zeros((64, 64), np.uint8)
    mask_pixels[:, 32:] = 255
    Image.fromarray(mask_pixels).save(mask)
    return xti, source, mask, guide


def test_a_batch_with_every_feature_leaves_the_models_as_they_were(tiny_models, tmp_path):
    """ControlNet + XTI + un-merged LoRA with --am + img2img in one batch, the mask making it
    regional LoRA (networks + --mask_path; inpainting alone is in tests/sampling/test_img2img.py):
    afterwards the U-Net and text encoder have exactly their modules, processors, weights and
    hooks of before the batch, and the image equals a fresh process's."""
    xti, source, mask, guide = _feature_files(tiny_models, tmp_path)
    argv = ["--ckpt", str(tiny_models["sd1"]), "--steps", "4", "--W", "64", "--H", "64", "--seed", "11",
            "--prompt", "a xcat --am 0.6", "--XTI_embeddings", str(xti),
            "--network_module", "networks.lora", "--network_weights", str(tiny_models["lora"]),
            "--control_net_models", str(tiny_models["controlnet-sd1"]), "--guide_image_path", str(guide),
            "--control_net_preps", "canny", "--image_path", str(source), "--mask_path", str(mask),
            "--strength", "0.75"]

    run = build_run([*argv, "--outdir", str(tmp_path / "here")])
    options, model, runner = run.options, run.model, run.runner
    before = _snapshot(model.unet, model.text_encoder)
    from library.prompts.seeds import SeedSource
    from library.prompts.sources import Line

    runner.run(runner.jobs([Line(options.rounds.prompt, "--prompt")], SeedSource(11, True), None))
    assert _snapshot(model.unet, model.text_encoder) == before
    (here,) = sorted((tmp_path / "here").glob("*.png"))

    code = "import sys, torch, gen_img; torch.set_num_threads(1); sys.exit(gen_img.main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *argv, "--outdir", str(tmp_path / "fresh")], cwd=ROOT, check=True,
                   capture_output=True)
    (fresh,) = sorted((tmp_path / "fresh").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(here)), np.asarray(Image.open(fresh)))
    assert gen_img.main([*argv[:-12], "--outdir", str(tmp_path / "plain")]) == 0  # the features do change it
    (other,) = sorted((tmp_path / "plain").glob("*.png"))
    assert not np.array_equal(np.asarray(Image.open(here)), np.asarray(Image.open(other)))


def test_inpainting_with_every_feature_leaves_the_models_as_they_were(tiny_models, tmp_path):
    """The same combination at the pipeline level (on the command line a mask with networks is a
    region mask): ControlNet + XTI + un-merged LoRA at --am 0.6 + an inpainting mask in one batch.
    The models keep their modules, processors, weights and hooks, and a second identical batch
    gives the same latents bit for bit (nothing of the first one stayed behind)."""
    from dataclasses import replace

    from library.features.inpainting import Inpainting
    from library.sampling.img2img import SourceImages

    xti, source, mask, guide = _feature_files(tiny_models, tmp_path)
    options = parse_options([
        "--ckpt", str(tiny_models["sd1"]), "--steps", "4", "--W", "64", "--H", "64", "--prompt", "x",
        "--XTI_embeddings", str(xti), "--network_module", "networks.lora", "--network_weights",
        str(tiny_models["lora"]), "--control_net_models", str(tiny_models["controlnet-sd1"]),
        "--guide_image_path", str(guide), "--outdir", str(tmp_path / "o")])
    runtime = build.Runtime.from_options(options.load)
    model = build.load(options.load, runtime)
    pipeline = build.pipeline(options, model, runtime, build.networks(options, model))
    pipeline.progress = False
    pipeline.patches.features.insert(0, Inpainting())  # first, where a run with an inpainting mask has it
    sources = SourceImages(str(source), str(mask))
    job = Job("a xcat", "", seed=11, width=64, height=64, steps=4, scale=5.0, strength=0.75,
              network_multipliers=(0.6,), guide_image=str(guide))
    job = sources.assign(job)
    before = _snapshot(model.unet, model.text_encoder)
    init = sources.load([job])
    first = pipeline.latents([job], init)
    assert _snapshot(model.unet, model.text_encoder) == before
    assert torch.equal(first[..., :3], init.source_latents[..., :3])  # outside the mask (and its edge): the source
    again = pipeline.latents([job], sources.load([job]))
    assert torch.equal(first, again)
    full_strength = pipeline.latents([replace(job, network_multipliers=(1.0,))], sources.load([job]))
    assert (full_strength - first).abs().max() > 1e-4  # --am reached the batch


class Interrupts(Recorder):
    def after_step(self, ctx, latents):
        raise KeyboardInterrupt


def test_hooks_are_removed_when_the_batch_is_interrupted(sd1):
    before = _snapshot(sd1.unet)
    with pytest.raises(KeyboardInterrupt):
        _latents(sd1, Interrupts("none"))
    assert _snapshot(sd1.unet) == before
    plain = make_pipeline(sd1, "euler")
    assert torch.equal(_latents(sd1, None), plain.latents([
        Job("a cat", "blur", seed=5, width=64, height=64, steps=3, scale=5.0),
        Job("a dog", "blur", seed=6, width=64, height=64, steps=3, scale=5.0)]))


class TextRoles(Patch):
    """Records each `text_encoding` call and how many LoRA deltas the text encoder made after it."""

    def __init__(self, layers) -> None:
        self.layers, self.seen = layers, []

    def lora_layers(self):
        return self.layers

    def text_encoding(self, role, part):
        self.seen.append([role, part, 0])

    def lora_output(self, ctx, layer, x, delta):
        if ctx is None:
            self.seen[-1][2] += 1
        return delta


@pytest.mark.parametrize("negative_scale,roles", [
    (None, [["prompt", 0], ["prompt", 1], ["negative", 0]]),
    (2.0, [["prompt", 0], ["prompt", 1], ["negative", 0], ["empty", 0]]),
])
def test_text_encoding_says_which_rows_the_text_encoder_encodes(tiny_models, negative_scale, roles):
    from library.features.lora import load_networks
    from library.records.options import NetworkOptions

    model = load_model(str(tiny_models["sd1"]))
    nets = load_networks(NetworkOptions(("networks.lora",), (str(tiny_models["lora"]),), (1.0,), (), False, False,
                                        None, False), model)
    te_layers = [(m, 1.0) for m in nets.loaded[0].text_encoder_loras]
    patch = TextRoles(te_layers)
    pipeline = make_pipeline(model, "ddim")
    pipeline.patches.add(FixedFeature(patch))
    job = Job("a cat AND a dog", "blur", seed=5, width=64, height=64, steps=1, scale=5.0,
              negative_scale=negative_scale, prompt_parts=("a cat", "a dog"))
    pipeline.latents([job])
    assert [s[:2] for s in patch.seen] == roles
    assert {s[2] for s in patch.seen} == {len(te_layers)}  # every TE LoRA layer once per encoding
