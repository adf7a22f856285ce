"""Attention Couple and Regional LoRA on the tiny SD1 model: locality of a part's text, parts
beyond the networks, identical parts, the merge formula against a direct computation, regional
LoRA's locality and batch invariance.

Locality bounds are measured on the first denoising step of a 256x64 image (latents 8 x 32) with
the left half red (part 0) and the right half green (part 1). The tiny random U-Net mixes the
whole image through GroupNorm statistics and self-attention, so "far side" changes are not 0:
the bounds below are what this model gives, with a margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.features.attention_couple import EPSILON, AttentionCouple
from library.features.lora import load_networks
from library.images.region_masks import load_region_mask
from library.models import load_model
from library.models.unet_blocks import cross_attention_modules
from library.records.jobs import Job
from library.records.options import NetworkOptions
from library.sampling.patches import FixedFeature, Patch
from library.text.weighting import split_and
from networks.lora_files import write_kohya_lora
from tests.helpers import make_pipeline

WIDTH, HEIGHT = 256, 64


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["sd1"]))


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> Path:
    """Left half red (part 0), right half green (part 1), blue empty."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:, : WIDTH // 2, 0] = 255
    pixels[:, WIDTH // 2 :, 1] = 255
    path = tmp_path_factory.mktemp("masks") / "halves.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def lora_model(tiny_models, tmp_path_factory):
    """A private model with two un-merged LoRAs (the tiny one and a second, seed 7), regional."""
    model = load_model(str(tiny_models["sd1"]))
    second = tmp_path_factory.mktemp("lora") / "second.safetensors"
    write_kohya_lora(second, model.text_encoder, model.unet, rank=4, seed=7)
    options = NetworkOptions(("networks.lora",) * 2, (str(tiny_models["lora"]), str(second)), (1.0, 1.0), (),
                             False, False, None, False)
    return model, load_networks(options, model, regional=True)


def job(prompt: str, seed: int = 3, scale: float = 5.0, steps: int = 6, **extra) -> Job:
    parts = split_and(prompt)
    return Job(prompt, "blur", seed, WIDTH, HEIGHT, steps, scale, prompt_parts=tuple(parts) if len(parts) > 1 else (),
               **extra)


class FirstStep(Patch):
    """A patch keeping the latents after the first step of each batch."""

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None

    def after_step(self, ctx, latents):
        if ctx.step == 0:
            self.latents = latents.clone()
        return latents


def couple(model, regions=None, networks=None):
    pipeline = make_pipeline(model, "ddim")
    if networks is not None:
        pipeline.patches.add(networks)
    pipeline.patches.add(AttentionCouple(model.unet, regions, networks))
    return pipeline


def first_step(pipeline, jobs: list[Job]) -> torch.Tensor:
    recorder = FirstStep()
    feature = FixedFeature(recorder)
    pipeline.patches.add(feature)
    try:
        pipeline.latents(jobs)
    finally:
        pipeline.patches.features.remove(feature)
    return recorder.latents


def column_change(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean |a - b| per latent column (over channels and rows) of image 0."""
    return (a - b).abs()[0].mean(dim=(0, 1)).numpy()


def test_changing_part_2_changes_mostly_its_own_half(model, halves):
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    pipeline = couple(model, regions)
    change = column_change(first_step(pipeline, [job("a cat AND a dog")]),
                           first_step(pipeline, [job("a cat AND a red house on a hill")]))
    far, own = change[:8].mean(), change[16:].mean()  # far quarter (left) vs part 2's half (right)
    assert own > 1.6 * far  # measured: own 0.905, far 0.479 (ratio 1.89)
    assert far < 0.6 and own > 0.8


def test_at_the_first_layer_part_2_changes_exactly_its_own_half(model, halves):
    """Before self-attention and GroupNorm mix the image, the change is exactly local: IN01's
    cross-attention output on the first call differs only in the right half's tokens."""
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    attn = cross_attention_modules(model.unet)["IN01"][0]
    outputs = []
    for prompt in ("a cat AND a dog", "a cat AND a red house on a hill"):
        capture = Capture(attn)
        try:
            couple(model, regions).latents([job(prompt, steps=1)])
        finally:
            capture.remove()
        outputs.append(capture.calls[0][2].view(2, 8, 32, -1))
    change = (outputs[0] - outputs[1]).abs()
    assert change[:, :, :16].max().item() == 0.0
    assert change[1, :, 16:].amax(dim=-1).min().item() > 1e-2  # every right token of the prompt row
    assert change[0].max().item() == 0.0  # the unconditional row never sees the parts


def test_without_a_mask_the_parts_share_the_image(model):
    pipeline = couple(model)
    change = column_change(first_step(pipeline, [job("a cat AND a dog")]),
                           first_step(pipeline, [job("a cat AND a red house on a hill")]))
    assert change.min() > 0.15  # every column changes (measured min 0.285)
    assert change[:16].mean() == pytest.approx(change[16:].mean(), rel=0.1)  # measured 0.398 vs 0.409


@pytest.mark.parametrize("with_mask", [False, True])
def test_two_identical_parts_give_the_image_of_the_one_prompt(model, halves, with_mask):
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT)) if with_mask else None
    one = make_pipeline(model, "ddim").latents([job("a cat")])
    two = couple(model, regions).latents([job("a cat AND a cat")])
    assert (one - two).abs().max() <= 1e-5


def test_a_part_beyond_the_networks_acts_on_the_whole_image(lora_model, halves):
    model, nets = lora_model
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    pipeline = couple(model, regions, nets)
    change = column_change(first_step(pipeline, [job("a cat AND a dog AND grass")]),
                           first_step(pipeline, [job("a cat AND a dog AND a red house on a hill")]))
    assert change.min() > 0.15  # part 3 has no blue: it covers the whole image (measured min 0.306)
    assert change[:16].mean() == pytest.approx(change[16:].mean(), rel=0.2)  # measured 0.452 vs 0.495


def test_regional_lora_k_changes_mostly_its_region(lora_model, halves):
    model, nets = lora_model
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    pipeline = couple(model, regions, nets)
    on = first_step(pipeline, [job("a cat AND a dog", network_multipliers=(1.0, 1.0))])
    off = first_step(pipeline, [job("a cat AND a dog", network_multipliers=(1.0, 0.0))])
    change = column_change(on, off)  # network 1 (right half) on vs off
    far, own = change[:8].mean(), change[16:].mean()
    assert own > 1.5 * far and far < 0.3  # measured: own 0.427, far 0.237 (ratio 1.80)


def test_batch_of_three_equals_three_batches_of_one(lora_model, halves):
    model, nets = lora_model
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    jobs = [job("a cat AND a dog", seed=1), job("a cow AND grass", seed=2), job("a red car AND a tree", seed=3)]
    jobs = [Job(j.prompt, j.negative_prompt, j.seed, 64, 64, 3, 5.0, negative_scale=2.0,
                prompt_parts=j.prompt_parts) for j in jobs]
    pipeline = couple(model, load_region_mask(str(regions.path), None, (64, 64)), nets)
    together = pipeline.latents(jobs)
    alone = torch.cat([pipeline.latents([j]) for j in jobs])
    # the project's batch bound (tests/run/test_generate.py): last-ulp differences of batched kernels
    assert ((together - alone).abs().max() / together.abs().max()).item() < 1e-5  # measured 3e-6


class Capture:
    """Test-only hooks on one attention module: its first call's inputs and output."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple] = []
        self.handles = [module.register_forward_hook(self._hook, with_kwargs=True)]

    def _hook(self, module, args, kwargs, output):
        self.calls.append((args[0].clone(), kwargs["encoder_hidden_states"].clone(), output.clone()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class KeepCond(Patch):
    def __init__(self) -> None:
        self.cond = None

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.cond = self.cond or cond
        return None


def _heads(attn, q, k, v):
    b, heads = q.shape[0], attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, heads * (q.shape[-1] // heads))


def test_merge_formula_matches_a_direct_computation_at_one_layer(lora_model, halves):
    """IN01's output on the first U-Net call against the formula written out by hand:
    q with every network's delta times its region, K/V with network k's delta in part k's
    prompt row only, and sum_k m_k O_k / max(sum_k m_k, 1e-4) + sum_k m_k mul_k dO_k."""
    model, nets = lora_model
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    pipeline = couple(model, regions, nets)
    keep = KeepCond()
    pipeline.patches.add(FixedFeature(keep))
    attn = cross_attention_modules(model.unet)["IN01"][0]
    capture = Capture(attn)
    muls = (0.8, 1.3)
    try:
        pipeline.latents([job("a cat AND a dog", steps=1, network_multipliers=muls)])
    finally:
        capture.remove()
    x, _, got = capture.calls[0]
    lora = {(i, name): next(m for m in net.unet_loras if m.module is getattr(attn, name) or (
        name == "to_out" and m.module is attn.to_out[0])) for i, net in enumerate(nets.loaded)
        for name in ("to_q", "to_k", "to_v", "to_out")}
    masks = F.interpolate(regions.regions(2)[None], (8, 32), mode="bilinear", align_corners=False)[0].flatten(1)
    with torch.no_grad():
        q = attn.to_q(x) + sum(muls[j] * masks[j][None, :, None] * lora[j, "to_q"].adapter.bypass(attn.to_q, x)
                               for j in range(2))
        uncond = keep.cond.states[:1]
        merged, outputs = 0, []
        for k, part in enumerate(keep.cond.parts):
            text = torch.cat([uncond, part.states])
            row = torch.tensor([0.0, 1.0])[:, None, None]  # K/V LoRA in the prompt row only
            key = attn.to_k(text) + row * muls[k] * lora[k, "to_k"].adapter.bypass(attn.to_k, text)
            value = attn.to_v(text) + row * muls[k] * lora[k, "to_v"].adapter.bypass(attn.to_v, text)
            a = _heads(attn, q, key, value)
            o = attn.to_out[0](a)
            d_o = muls[k] * lora[k, "to_out"].adapter.bypass(attn.to_out[0], a)
            merged = merged + masks[k][None, :, None] * (o / masks.sum(0).clamp_min(EPSILON)[None, :, None] + d_o)
            outputs.append(o)
    assert torch.allclose(got[1:], merged[1:], atol=1e-5)
    assert torch.allclose(got[:1], outputs[0][:1], atol=1e-5)  # uncond: plain attention, no K/V/out LoRA
    assert (got[1:] - outputs[0][1:]).abs().max() > 1e-2  # the merge changed something


def test_masks_follow_whatever_resolution_the_layer_meets():
    """A 6x6 attention (what Deep Shrink 0.75 or Gradual Latent make of an 8x8 latent) gets the
    regions bilinearly resized to 6x6: the merge of two parts whose attention outputs are the
    constants 1 and 3 is exactly the resized, normalised masks' blend."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from library.features.attention_couple import CouplePatch
    from library.sampling.patches import BatchLayout, StepContext
    from library.text.encoder import Conditioning

    regions = torch.zeros(2, 8, 8)
    regions[0, :, :4] = 1
    regions[1, :, 3:] = 1  # columns 3 overlap
    patch = CouplePatch(regions)
    parts = (Conditioning(torch.full((1, 77, 4), 1.0)), Conditioning(torch.full((1, 77, 4), 3.0)))
    cond = Conditioning(torch.zeros(2, 77, 4), parts=parts)
    ctx = StepContext(0, 1, 999, None, BatchLayout(images=1, copies=2, latent_height=8, latent_width=8))
    patch.install(ExitStack(), SimpleNamespace(cond=cond))  # the run's current call: its texts
    hidden = torch.zeros(2, 36, 4)
    out = patch.cross_attention_output(ctx, "IN01", hidden, cond.states,
                                       lambda text, tag=None: text.mean(dim=1, keepdim=True).expand(-1, 36, 4))
    masks = F.interpolate(regions[None], (6, 6), mode="bilinear", align_corners=False)[0].flatten(1)
    expected = (masks[0] * 1.0 + masks[1] * 3.0) / (masks[0] + masks[1])
    assert torch.allclose(out[1, :, 0], expected, atol=1e-6)
    assert out[1].view(6, 6, 4)[:, 0].eq(1.0).all() and out[1].view(6, 6, 4)[:, 5].eq(3.0).all()
    assert out[0].eq(0.0).all()  # the unconditional row: its own (zero) text


def _encode_with(model, prompts: list[str], loras) -> torch.Tensor:
    """`prompts` encoded with only the text-encoder LoRA modules `loras` (test-only hooks)."""
    from library.text.encoder import PromptEncoder

    handles = [m.module.register_forward_hook(lambda mod, args, out, m=m: out + m.adapter.bypass(mod, args[0]))
               for m in loras]
    try:
        encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=model.kind.default_clip_skip)
        return encoder.conditioning(prompts, 1).states
    finally:
        for handle in handles:
            handle.remove()


def test_text_encoder_lora_k_encodes_part_k_only_and_never_the_negative(lora_model, halves):
    model, nets = lora_model
    regions = load_region_mask(str(halves), None, (WIDTH, HEIGHT))
    pipeline = couple(model, regions, nets)
    keep = KeepCond()
    pipeline.patches.add(FixedFeature(keep))
    pipeline.latents([job("a cat AND a dog", steps=1)])
    first, second = (net.text_encoder_loras for net in nets.loaded)
    assert torch.allclose(keep.cond.parts[0].states, _encode_with(model, ["a cat"], first), atol=1e-6)
    assert torch.allclose(keep.cond.parts[1].states, _encode_with(model, ["a dog"], second), atol=1e-6)
    assert torch.equal(keep.cond.states[:1], _encode_with(model, ["blur"], []))
    assert (keep.cond.parts[1].states - _encode_with(model, ["a dog"], [])).abs().max() > 1e-2


def test_regional_deltas_are_masked_except_the_time_embedding_projections():
    """Network 0's conv delta (rows, C, h, w) and token delta (rows, h*w, C) are multiplied by
    region 0 at their own size; a time-embedding projection's (rows, C) is left alone."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from library.features.attention_couple import RegionalLoRAPatch
    from library.sampling.patches import BatchLayout, StepContext

    regions = torch.zeros(2, 8, 8)
    regions[0, :, :4] = 1
    regions[1, :, 4:] = 1
    layer = SimpleNamespace(module=torch.nn.Linear(2, 2))
    patch = RegionalLoRAPatch(regions, {}, {id(layer): 0}, {0: 1.0})
    ctx = StepContext(0, 1, 999, None, BatchLayout(images=1, copies=2, latent_height=8, latent_width=8))
    time = torch.ones(2, 5)
    assert patch.lora_output(ctx, layer, time, time) is time
    conv = patch.lora_output(ctx, layer, None, torch.ones(2, 3, 4, 4))
    assert conv[:, :, :, :2].eq(1).all() and conv[:, :, :, 2:].eq(0).all()
    tokens = patch.lora_output(ctx, layer, None, torch.ones(2, 64, 3)).view(2, 8, 8, 3)
    assert tokens[:, :, :4].eq(1).all() and tokens[:, :, 4:].eq(0).all()
    run = SimpleNamespace(text=("negative", 0))  # what the text encoder encodes now
    patch.install(ExitStack(), run)
    assert patch.lora_output(None, layer, time, time).eq(0).all()  # never on the negative prompt
    run.text = ("prompt", 0)
    assert patch.lora_output(None, layer, time, time) is time
