"""SDXL: U-Net seconds per call against diffusers' `StableDiffusionXLPipeline`, whole-process wall and peak RSS.

    python -m tools.bench sdxl [--sizes 512 1024] [--steps 3] [--dtype bf16] [--rounds 2]
        [--cache_dir ~/.cache/sdgen-bench | --ckpt FILE | --tiny] [--json PATH]

Without `--ckpt`/`--tiny` it first writes (once, into `--cache_dir`) a full-size SDXL-shaped
checkpoint with fixed random weights (`full_size_sdxl_checkpoint`: SDXL base's shapes,
fp16, ~6.9 GB, Stability AI's single-file layout). Writing it holds the fp16 tensors in memory
once (~7 GB); a bf16 run holds the bf16 weights (~7 GB) plus activations.

The checkpoint is written before the measurement starts. The measurement runs in a child
process, so its wall time (interpreter start to exit) and its
peak RSS (`ru_maxrss`) are those of a whole run. In the child, `load_model` loads the file
(with our attention processor, `library.models.attention`), diffusers' `StableDiffusionXLPipeline`
is built from the very same modules and run for `--steps` steps per size (latents out, no
decode) with diffusers' default `AttnProcessor2_0`; forward hooks time each of its U-Net
calls and keep the inputs of its first. Our side calls the same U-Net on those inputs with
our processor, as many times, alternating with the pipeline round by round so a change in
machine speed weighs on both sides alike. Reported per size: median seconds per U-Net call
of each side and their ratio (ours / diffusers), plus the bf16 weight size the peak RSS is
compared with.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tools.bench.common import (
    DEFAULT_CACHE,
    DTYPES,
    _random_weights,
    child_env,
    entry_command,
    machine_info,
    maxrss_gb,
    round_order,
)

logger = logging.getLogger(__name__)

SDXL_CHECKPOINT_NAME = "sdxl-shaped-random-v1-fp16.safetensors"
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def full_size_sdxl_checkpoint(cache_dir: Path) -> Path:
    """The SDXL-shaped random checkpoint in `cache_dir`, written on first use (~6.9 GB fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.ldm_export import to_ldm_checkpoint

    path = cache_dir.expanduser() / SDXL_CHECKPOINT_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing the full-size random SDXL checkpoint %s (once, ~7 GB)", path)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
    generator = torch.Generator().manual_seed(0)
    tensors = to_ldm_checkpoint(
        _random_weights(unet, generator), _random_weights(vae, generator), _random_weights(te1, generator),
        dict(unet.config), "sdxl", _random_weights(te2, generator),
    )
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides (default 512 1024)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per pipeline run (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per size (default 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--ckpt", help="benchmark this SDXL checkpoint instead of the random one")
    model.add_argument("--tiny", action="store_true", help="the tiny SDXL test model (checks the tool, fast)")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help=f"where the random checkpoint is kept "
                        f"(default {DEFAULT_CACHE})")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: the measuring process
    parser.add_argument("--write_only", action="store_true", help=argparse.SUPPRESS)  # internal: the writer


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.steps < 1 or args.rounds < 1 or min(args.sizes) < 8 or any(s % 8 for s in args.sizes):
        return "--steps and --rounds must be >= 1 and --sizes multiples of 8"
    return None


def command(args: argparse.Namespace) -> int:
    """Run the measurement in a child process; report its figures, wall time and peak RSS."""
    if args.child is not None:
        args.child.write_text(json.dumps(measure(args)))
        return 0
    if args.write_only:
        full_size_sdxl_checkpoint(Path(args.cache_dir))
        return 0
    if not (args.ckpt or args.tiny):  # written first, by a process of its own (it holds ~7 GB)
        path = Path(args.cache_dir).expanduser() / SDXL_CHECKPOINT_NAME
        if not path.is_file():
            subprocess.run(entry_command("sdxl", "--write_only", "--cache_dir", args.cache_dir),
                           env=child_env(), check=True)
        args.ckpt = str(path)
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as scratch:
        out = Path(scratch) / "figures.json"
        argv = [*_passed_on(args), "--child", str(out)]
        start = time.perf_counter()
        child = subprocess.Popen(entry_command("sdxl", *argv), env=child_env())
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (not the writer's)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        peak = maxrss_gb(usage.ru_maxrss)
        if child.returncode != 0:
            logger.error("the measuring process failed (exit %d)", child.returncode)
            return child.returncode
        figures = json.loads(out.read_text())
    figures.update(process_wall_s=round(wall, 2), process_peak_rss_gb=round(peak, 2), machine=machine_info())
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _passed_on(args: argparse.Namespace) -> list[str]:
    """The options of this run, for the child."""
    argv = ["--sizes", *map(str, args.sizes), "--steps", str(args.steps), "--rounds", str(args.rounds),
            "--dtype", args.dtype, "--cache_dir", args.cache_dir]
    if args.ckpt:
        argv += ["--ckpt", args.ckpt]
    if args.tiny:
        argv.append("--tiny")
    return argv


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load, build diffusers' SDXL pipeline from our modules, time U-Net calls per size."""
    from library.models import load_model

    dtype = DTYPES[args.dtype]
    path = _checkpoint(args)
    start = time.perf_counter()
    model = load_model(str(path), dtype=dtype, attention="auto")
    load_s = time.perf_counter() - start
    if model.text_encoder_2 is None:
        raise SystemExit(f"{path}: not an SDXL checkpoint ({model.kind.name})")
    weights = sum(p.numel() for m in (model.unet, model.vae, model.text_encoder, model.text_encoder_2)
                  for p in m.parameters()) * 2 / 1e9
    pipe = _diffusers_pipeline(model)
    sizes: dict[str, Any] = {}
    figures = {"checkpoint": str(path), "dtype": args.dtype, "steps": args.steps, "rounds": args.rounds,
               "load_s": round(load_s, 2), "weights_16bit_gb": round(weights, 2), "sizes": sizes}
    for side in args.sizes:
        sizes[str(side)] = _measure_size(pipe, model.unet, side, args)
        logger.info("size %d: %s", side, sizes[str(side)])  # on stderr at once: long runs may be cut short
    return figures


def _checkpoint(args: argparse.Namespace) -> Path:
    if args.ckpt:
        return Path(args.ckpt).expanduser()
    if args.tiny:
        from library.models.tiny_files import make_tiny_models

        return make_tiny_models(Path(args.cache_dir).expanduser() / "tiny", ("sdxl",))["sdxl"]
    return full_size_sdxl_checkpoint(Path(args.cache_dir))


def _diffusers_pipeline(model):
    """diffusers' `StableDiffusionXLPipeline` over the loaded modules (shared, not copied)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _CallClock:
    """Forward hooks on the U-Net: seconds of each call, and the inputs of the first."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.times: list[float] = []
        self.inputs: tuple[tuple, dict] | None = None
        self._start = 0.0
        self._handles = [unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         unet.register_forward_hook(self._after)]

    def _before(self, _module, args, kwargs):
        if self.inputs is None:
            self.inputs = (args, dict(kwargs))
        self._start = time.perf_counter()

    def _after(self, *_):
        self.times.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _measure_size(pipe, unet: torch.nn.Module, side: int, args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline runs (diffusers' processor) alternating with as many direct calls (ours)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    ours_processors = unet.attn_processors
    times: dict[str, list[float]] = {"diffusers": [], "ours": []}
    inputs = None
    for index in range(args.rounds + 1):  # round 0 warms up and captures the inputs
        for side_name in round_order(("diffusers", "ours"), index):
            if side_name == "diffusers":
                unet.set_attn_processor(AttnProcessor2_0())
                clock = _CallClock(unet)
                with torch.no_grad():
                    pipe(prompt="a photo of a cat", height=side, width=side, num_inference_steps=args.steps,
                         guidance_scale=7.0, output_type="latent", generator=torch.Generator().manual_seed(0))
                clock.remove()
                unet.set_attn_processor(dict(ours_processors))  # it pops from the dict it is given
                inputs = inputs or clock.inputs
                calls = clock.times
            elif inputs is None:
                continue
            else:
                calls = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    with torch.no_grad():
                        unet(*inputs[0], **inputs[1])
                    calls.append(time.perf_counter() - start)
            if index > 0:
                times[side_name] += calls
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"ours_s_per_call": round(ours, 4), "diffusers_s_per_call": round(theirs, 4),
            "ratio": round(ours / theirs, 3), "calls": len(times["ours"]),
            "rows": int(inputs[0][0].shape[0]) if inputs and inputs[0] else None}


def report(figures: dict[str, Any]) -> str:
    """The figures as a short table."""
    lines = [f"SDXL {figures['dtype']}, {figures['steps']} steps x {figures['rounds']} rounds, "
             f"{figures['machine'].get('cpu', '')}",
             f"load {figures['load_s']} s; whole process {figures['process_wall_s']} s, peak RSS "
             f"{figures['process_peak_rss_gb']} GB (16-bit weights {figures['weights_16bit_gb']} GB)",
             "size   ours s/call   diffusers s/call   ratio"]
    for side, f in figures["sizes"].items():
        lines.append(f"{side:>5}  {f['ours_s_per_call']:>11}   {f['diffusers_s_per_call']:>16}   {f['ratio']:>5}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it as: python -m tools.bench sdxl")
