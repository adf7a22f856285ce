"""Helpers shared by test modules, so that no test module imports another.

Running `gen_img.py` in-process and reading what it wrote; a Pipeline on a loaded model;
a source picture for img2img; the configs of the full-size SD layouts; fresh tiny models,
fixed inputs and output snapshots for the LoRA tests. Shared fixtures live in `conftest.py`.
Test modules import helpers from here only, never from each other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import gen_img
from library.images.metadata import read_generation_text
from library.models.tiny import TinyComponents, build_tiny_components
from library.sampling.patches import Feature, Patch
from library.sampling.pipeline import Pipeline
from library.text.encoder import PromptEncoder

ROOT = Path(__file__).resolve().parent.parent  # the repository

# --- running the command ------------------------------------------------------------------------

TXT2IMG_FAST = ["--steps", "3", "--W", "64", "--H", "64"]
IMG2IMG_FAST = ["--steps", "6", "--scale", "5", "--sampler", "ddim"]


def run(tiny_models: dict[str, Path], outdir: Path, *extra: str, kind: str = "sd1") -> int:
    """`gen_img.py` on the tiny model of `kind`: 3 steps, 64x64, plus `extra` options."""
    return gen_img.main(["--ckpt", str(tiny_models[kind]), "--outdir", str(outdir), *TXT2IMG_FAST, *extra])


def run_img2img(tiny_models: dict[str, Path], outdir: Path, *extra: str) -> int:
    """`gen_img.py` on the tiny SD1 model with 6 DDIM steps at scale 5, plus `extra` options."""
    return gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(outdir), *IMG2IMG_FAST, *extra])


def img2img_error(tiny_models: dict[str, Path], tmp_path: Path, capsys, *extra: str) -> str:
    """The one error line of a `run_img2img` that must fail with status 2 and write nothing."""
    try:
        code = run_img2img(tiny_models, tmp_path / "out", *extra)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if "error" in line]) == 1
    assert not pngs(tmp_path / "out") if (tmp_path / "out").exists() else True
    return err[-1]


# --- reading the outputs ------------------------------------------------------------------------


def pngs(outdir: Path) -> list[Path]:
    """The PNG files in `outdir`, by name."""
    return sorted(outdir.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    """An image's RGB pixels as int16, so that differences do not wrap around."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def meta(path: Path) -> dict[str, str]:
    """An image's text metadata."""
    return read_generation_text(path)


# --- building inputs ----------------------------------------------------------------------------


def make_pipeline(model, sampler: str, *features: Feature) -> Pipeline:
    """A CPU fp32 Pipeline on a loaded model, with the model's default clip skip and `features`
    (none by default: give `Inpainting()` to inpaint, as a run with an inpainting mask has it)."""
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=model.kind.default_clip_skip)
    return Pipeline(model.unet, model.vae, encoder, sampler, model.kind.v_prediction,
                    torch.device("cpu"), torch.float32, torch.device("cpu"), progress=False, features=list(features))


@dataclass
class BuiltRun:
    """The objects of a run, built as `gen_img.main` builds them."""

    options: object
    model: object
    networks: object
    pipeline: Pipeline
    runner: object


def build_run(argv: list[str]) -> BuiltRun:
    """Parse `argv` and build model, networks, pipeline (no progress bars) and runner, for tests
    that drive batches themselves."""
    from library.cli.parser import parse_options
    from library.run import build

    options = parse_options(argv)
    runtime = build.Runtime.from_options(options.load)
    model = build.load(options.load, runtime)
    networks = build.networks(options, model)
    pipeline = build.pipeline(options, model, runtime, networks)
    pipeline.progress = False
    return BuiltRun(options, model, networks, pipeline, build.runner(options, model, pipeline))


def make_source(path: Path, size=(64, 64), seed: int = 0, mode: str = "RGB") -> Path:
    """A smooth random picture (a VAE round-trip of noise would be meaningless)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize(size, Image.Resampling.BICUBIC).convert(mode).save(path)
    return path


# --- full-size layouts (configs only; the tests build them on the meta device or slowly) --------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_layers_per_block=1,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, norm_num_groups=32,
)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
#: SDXL base: U-Net (3 levels, transformer depths 0/2/10, 64-wide heads, 2816-wide added conditioning)
#: and its second text encoder, OpenCLIP ViT-bigG (all 32 blocks, projection 1280).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


class StepRecorder(Patch):
    """A patch calling `record(step, timestep)` after every step (as `FixedFeature(StepRecorder(...))`,
    of every batch)."""

    def __init__(self, record) -> None:
        self.record = record

    def after_step(self, ctx, latents):
        self.record(ctx.step, ctx.timestep)
        return latents


def assert_override_stays_on_its_line(tiny_models: dict[str, Path], tmp_path: Path, common: list[str],
                                      override: str) -> None:
    """A prompt file whose line 1 carries `override` and line 2 none: line 2 (batched with line 1
    when the settings allowed it) is bit-identical to line 2 run alone, and line 1 differs from
    itself without the override."""
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"a cat --d 5 {override}\na dog --d 6\n")
    assert run(tiny_models, tmp_path / "file", *common, "--from_file", str(lines), "--batch_size", "2",
               "--sequential_file_name") == 0
    assert run(tiny_models, tmp_path / "alone", *common, "--prompt", "a dog --d 6") == 0
    assert run(tiny_models, tmp_path / "first", *common, "--prompt", "a cat --d 5") == 0
    first, second = pngs(tmp_path / "file")
    assert np.array_equal(pixels(second), pixels(pngs(tmp_path / "alone")[0]))
    assert np.abs(pixels(first) - pixels(pngs(tmp_path / "first")[0])).max() > 0


# --- LoRA tests: fresh tiny models, fixed inputs, output snapshots --------------------------------


@cache
def _cached(kind: str) -> TinyComponents:
    return build_tiny_components(kind, seed=0)


def fresh(kind: str = "sd1") -> TinyComponents:
    """A private copy of the tiny models (tests patch them)."""
    c = _cached(kind)
    return type(c)(c.kind, copy.deepcopy(c.text_encoder), copy.deepcopy(c.unet), c.vae)


def unet_inputs(c: TinyComponents, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = c.unet.config.cross_attention_dim
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 77, width, generator=g)
    return latents, timesteps, context


def token_ids(seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49406, (2, 77), generator=g)


@torch.no_grad()
def outputs(c: TinyComponents) -> tuple[Tensor, Tensor]:
    """(U-Net output, text-encoder last hidden state) on fixed inputs."""
    unet_out = c.unet(*unet_inputs(c)).sample
    te_out = c.text_encoder(token_ids()).last_hidden_state
    return unet_out, te_out


def weights(*models: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter, to compare with torch.equal later."""
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def assert_same_weights(before: dict[str, Tensor], *models: nn.Module) -> None:
    after = weights(*models)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks for model in models for m in model.modules())
