"""Measure what CLIP / VGG16 guidance costs per step: time and peak memory, guided vs plain.

    python -m tools.bench guidance [--tiny] [--ckpt FILE] [--size 512] [--steps 3] [--sampler ddim]
        [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--clip_model PATH] [--vgg16_weights FILE]
        [--no_checkpointing] [--only clip|vgg]

Without `--tiny`/`--ckpt` it uses the full-size SD 1.5-shaped random checkpoint shared by the
benchmarks (`tools.bench.common`, written once into its cache). Without `--clip_model` / `--vgg16_weights`
it builds random networks of the real shapes (CLIP ViT-B/32, VGG16; the tiny ones with
`--tiny`): the cost depends on shapes, not on weights. One image (batch 1, CFG scale 7.5); for
each of plain, CLIP text guidance and VGG16 guidance (scale 100) it runs `--steps` steps twice
and reports the second run: seconds per step and the peak memory (CUDA: max allocated; CPU:
process RSS high-water mark, reset per run). See docs/guidance.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from library.features.guidance import ClipGuide, GuidedGeneration, Scales, VggGuide
from library.models import load_model
from library.records.jobs import Job
from library.sampling.pipeline import Pipeline
from library.text.encoder import PromptEncoder
from tools.bench.common import (
    DEFAULT_CACHE,
    DTYPES,
    checkpoint_path,
    peak_memory_gb,
    reset_peak_memory,
    synchronize,
)

logger = logging.getLogger(__name__)


def random_clip(tiny: bool) -> torch.nn.Module:
    """A random CLIPModel: the tiny test one, or ViT-B/32's shapes (LAION's config)."""
    from transformers import CLIPConfig, CLIPModel

    from library.models.clip_guidance import tiny_clip_model

    if tiny:
        return tiny_clip_model(seed=0)
    text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="gelu", eos_token_id=49407)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512))
    return model.eval().requires_grad_(False)


def random_vgg(tiny: bool) -> torch.nn.Sequential:
    """Random VGG16 features: the tiny test ones, or the real layout."""
    from library.models.vgg16 import (
        LAYOUT,
        build_features,
        conv_indices,
        tiny_vgg16_state_dict,
    )

    if tiny:
        state = tiny_vgg16_state_dict()
        features = build_features([int(state[f"features.{i}.weight"].shape[0]) for i in conv_indices()])
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("f")})
        return features.eval().requires_grad_(False)
    return build_features([w for w in LAYOUT if w != "M"]).eval().requires_grad_(False)


def measure(gen: Pipeline, job: Job, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak GB) of the second of two runs of `job`."""
    for _ in range(2):
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        gen.latents([job])
        synchronize(device)
        seconds = (time.perf_counter() - start) / job.steps
    return seconds, peak_memory_gb(device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ckpt")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--clip_model")
    p.add_argument("--vgg16_weights")
    p.add_argument("--no_checkpointing", action="store_true", help="decoder backward without checkpointing")
    p.add_argument("--only", choices=["clip", "vgg"], help="measure plain and this guidance only")


def command(args: argparse.Namespace) -> int:
    """Measure plain and guided steps in a scratch folder; print the table."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as scratch:
        return bench(args, device, dtype, Path(scratch))


def bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, scratch: Path) -> int:
    """Load, build, measure and print the table (tiny models and the guide image go to `scratch`)."""
    if args.tiny:
        from library.models.tiny_files import make_tiny_models

        ckpt = str(make_tiny_models(scratch, ("sd1",))["sd1"])
    else:
        ckpt = str(checkpoint_path(args.ckpt, DEFAULT_CACHE))
    model = load_model(ckpt, dtype=dtype, vae_dtype=dtype, device=device)
    if args.clip_model:
        from library.models.clip_guidance import load_clip_model

        clip_model = load_clip_model(args.clip_model, device, dtype)
    else:
        clip_model = random_clip(args.tiny).to(device, dtype)
    if args.vgg16_weights:
        from library.models.vgg16 import load_vgg16_features

        vgg = load_vgg16_features(args.vgg16_weights, device, dtype)
    else:
        vgg = random_vgg(args.tiny).to(device, dtype)
    clip, vgg_guide = ClipGuide(clip_model, model.tokenizer), VggGuide(vgg, 20)
    guide = scratch / "guide.png"
    from PIL import Image

    Image.new("RGB", (args.size, args.size), (120, 80, 40)).save(guide)
    job = Job("a photo of a red car", "blurry", seed=1, width=args.size, height=args.size, steps=args.steps,
              scale=7.5, guide_image=str(guide))
    rows = []
    for name, scales in (("plain", None), ("CLIP text 100", Scales(clip_text=100.0)),
                         ("VGG16 100 (layer 20)", Scales(vgg16=100.0))):
        encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=1)
        if scales is not None and args.only and not (scales.clip_text if args.only == "clip" else scales.vgg16):
            continue
        features = [GuidedGeneration(model.vae, scales, clip, vgg_guide,
                                     checkpoint_decoder=not args.no_checkpointing)] if scales else []
        gen = Pipeline(model.unet, model.vae, encoder, args.sampler, model.kind.v_prediction, device, dtype, device,
                       progress=False, features=features)
        seconds, peak = measure(gen, job, device)
        rows.append((name, seconds, peak))
        logger.info("%s: %.3f s/step, peak %.2f GB", name, seconds, peak)
    print(f"{'':24} s/step   x plain  peak GB   ({args.device}, {args.dtype}, {args.size}x{args.size}, "
          f"{args.sampler}, {'tiny' if args.tiny else Path(ckpt).name}"
          f"{', no checkpointing' if args.no_checkpointing else ''})")
    for name, seconds, peak in rows:
        print(f"{name:24} {seconds:7.3f}  {seconds / rows[0][1]:7.1f}  {peak:7.2f}")
    return 0

