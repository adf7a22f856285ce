"""Features on the tiny SDXL: Deep Shrink's input-block table, Attention Couple's pooled vector,
Gradual Latent, CLIP / VGG16 guidance."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from library.features.deep_shrink import DeepShrinkFeature, ShrinkDeepLayers
from library.models import load_model
from library.records.deep_shrink_settings import DeepShrink
from library.records.gradual_latent_settings import GradualLatent
from library.records.jobs import Job
from library.sampling.entry_blocks import entry_blocks
from library.sampling.patches import Batch, BatchLayout, FixedFeature, Patch, PatchOwner
from library.text.encoder import Conditioning
from tests.helpers import make_pipeline


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    return load_model(str(tiny_models["sdxl-diffusers"]))


def _block_outputs(unet, settings: DeepShrink | None) -> tuple[list[int], tuple]:
    """The output side of each of the nine input blocks, and the U-Net's output shape, for a 16x16 sample."""
    sizes: list[int] = []
    hooks = [b.register_forward_hook(lambda m, a, out: sizes.append(
        (out[0] if isinstance(out, tuple) else out).shape[-1])) for b in entry_blocks(unet)]
    features = [FixedFeature(ShrinkDeepLayers(settings, unet if 0 in (settings.depth_1, settings.depth_2) else None))
                ] if settings else []
    owner = PatchOwner(unet, features)
    batch = Batch((), BatchLayout(1, 1, 16, 16), None, torch.tensor([900]), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    cond = Conditioning(torch.randn(1, 77, width, generator=g), pooled=torch.randn(1, pooled_width, generator=g),
                        time_ids=torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]))
    sample = torch.randn(1, 4, 16, 16, generator=g)
    try:
        with torch.no_grad(), owner.installed(batch) as run_:
            out = run_.unet_call(run_.context(0, torch.tensor(900)), sample, torch.tensor(900), cond)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes, tuple(out.shape)


def test_deep_shrink_depths_index_the_nine_input_blocks(sdxl):
    unet = sdxl.unet
    assert len(entry_blocks(unet)) == 9
    plain, shape = _block_outputs(unet, None)
    assert plain == [16, 16, 16, 8, 8, 8, 4, 4, 4] and shape == (1, 4, 16, 16)
    # depth 3 (the first downsample): its input is halved, so it and every later block run at half size
    assert _block_outputs(unet, DeepShrink(3, 0)) == ([16, 16, 16, 4, 4, 4, 2, 2, 2], (1, 4, 16, 16))
    # depth 7 (level 2's first resnet): only blocks 7 and 8 are small
    assert _block_outputs(unet, DeepShrink(7, 0)) == ([16, 16, 16, 8, 8, 8, 4, 2, 2], (1, 4, 16, 16))
    # depth 0 shrinks conv_in's input; the output is resized back before the final norm
    assert _block_outputs(unet, DeepShrink(0, 0)) == ([8, 8, 8, 4, 4, 4, 2, 2, 2], (1, 4, 16, 16))
    # the gate: below timesteps_1 nothing shrinks
    assert _block_outputs(unet, DeepShrink(3, 950))[0] == plain


def test_deep_shrink_depth_range_is_0_to_8(sdxl):
    from library.errors import UserError

    feature = DeepShrinkFeature(len(entry_blocks(sdxl.unet)), sdxl.unet)
    feature.check_settings(DeepShrink(8))
    with pytest.raises(UserError) as error:
        feature.check_settings(DeepShrink(9))
    assert str(error.value) == ("Deep Shrink depth 1 (--ds_depth_1/--dsd1) 9: this U-Net's input blocks are "
                                "0 to 8")


def test_gradual_latent_changes_the_sdxl_image(sdxl):
    from library.features.gradual_latent import GradualLatentFeature

    settings = GradualLatent(900, 0.5, 0.25, 1, 1.0, None)
    job = Job("a cat", "", seed=1, width=64, height=64, steps=4, scale=5.0)
    pipeline = make_pipeline(sdxl, "euler_a", GradualLatentFeature("euler_a"))
    plain, grown = pipeline.latents([job]), pipeline.latents([replace(job, gradual_latent=settings)])
    assert grown.shape == plain.shape == (1, 4, 8, 8) and torch.isfinite(grown).all()
    assert (grown - plain).abs().max() > 0.01


class Pooled(Patch):
    def __init__(self) -> None:
        self.pooled: list[torch.Tensor] = []

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.pooled.append(cond.pooled.clone())


def test_attention_couple_pooled_vector_is_the_last_parts(sdxl):
    recorder = Pooled()
    pipeline = make_pipeline(sdxl, "ddim", FixedFeature(recorder))
    parts = ("a red cat", "a blue dog")
    job = Job(" AND ".join(parts), "", seed=1, width=64, height=64, steps=1, scale=5.0, prompt_parts=parts)
    cond = pipeline._conditioning((job,), type("C", (), {"copies": 2})())
    last = pipeline.encoder.conditioning(["a blue dog"], 1).pooled
    first = pipeline.encoder.conditioning(["a red cat"], 1)
    assert torch.equal(cond.pooled[1], last[0]) and not torch.equal(cond.pooled[1], first.pooled[0])
    assert torch.equal(cond.states[1], first.states[0])  # the states of the prompt rows: part 0's


def test_clip_guidance_guides_sdxl_rows(tiny_models, sdxl):
    """The guide's extra U-Net call on one row carries that row's pooled vector and size numbers."""
    from library.features.guidance import ClipGuide, GuidedGeneration, Scales
    from library.models.clip_guidance import load_clip_model

    clip = ClipGuide(load_clip_model(str(tiny_models["clip"]), torch.device("cpu"), torch.float32), sdxl.tokenizer)
    recorder = Pooled()
    job = Job("a girl", "", seed=2, width=64, height=64, steps=3, scale=5.0)
    plain = make_pipeline(sdxl, "ddim").latents([job])
    guided_pipeline = make_pipeline(sdxl, "ddim", FixedFeature(recorder))
    guided_pipeline.patches.add(GuidedGeneration(sdxl.vae, Scales(clip_text=100), clip))
    guided = guided_pipeline.latents([job])
    assert (guided - plain).abs().max() > 0
    assert [p.shape[0] for p in recorder.pooled] == [2, 1] * 3  # each step: the CFG call, then the guide's row
    assert all(torch.equal(one[0], both[1]) for both, one in zip(recorder.pooled[::2], recorder.pooled[1::2]))


def test_a_lora_tag_weighs_both_text_encoders_by_its_te_multiplier(tiny_models, sdxl):
    """`<lora:NAME:TE:UNET>` on SDXL: the lora_te1_ and lora_te2_ layers take TE, the U-Net's UNET."""
    from pathlib import Path
    from types import SimpleNamespace

    from library.features.lora_tags import PromptLoras
    from library.records.extra_networks import LoraUse

    path = str(tiny_models["lora-sdxl"])
    feature = PromptLoras.from_run(SimpleNamespace(model=sdxl))
    job = Job("a cat", "", seed=1, width=64, height=64, steps=1, scale=5.0,
              loras=(LoraUse(Path(path).stem, path, 0.25, 0.75),))
    batch = Batch((job,), BatchLayout(1, 2, 8, 8), None, torch.tensor([1]), torch.device("cpu"), torch.float32)
    patch = feature.for_batch(batch)
    encoders = {id(m) for m in sdxl.text_encoder.modules()}, {id(m) for m in sdxl.text_encoder_2.modules()}
    weights = {"te1": set(), "te2": set(), "unet": set()}
    for layer, multiplier in patch.lora_layers():
        where = "te1" if id(layer.module) in encoders[0] else "te2" if id(layer.module) in encoders[1] else "unet"
        weights[where].add(multiplier)
    assert weights == {"te1": {0.25}, "te2": {0.25}, "unet": {0.75}}
