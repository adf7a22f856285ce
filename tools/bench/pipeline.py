"""Benchmark our txt2img path against diffusers' `StableDiffusionPipeline` on the same weights.

    python -m tools.bench pipeline [--device cpu] [--dtype fp32|fp16|bf16] [--channels_last] [--compile]
        [--size 256] [--steps 10] [--batch_size 1] [--sampler ddim] [--runs 2]
        [--cache_dir ~/.cache/sdgen-bench | --ckpt FILE | --tiny] [--json PATH] [--load_only]

(`python -m tools.bench report` gives the whole-process figures and the U-Net calls against
diffusers' processor, docs/performance.md's figures of record.)

Without `--ckpt`/`--tiny` it first writes (once, into `--cache_dir`) a full-size SD 1.5-shaped
checkpoint with fixed random weights: same shapes, FLOPs and memory as a real one, fp16 on
disk (~2 GB), in the LDM single-file layout via `library.models.ldm_export`. Then it measures:

* load: `load_model` (file to ready-to-run) vs `safetensors.torch.load_file` alone, each in a
  fresh child process with the file in the page cache, interleaved; timed when the call
  returns and once every weight is resident in the run's dtype; peak memory of each
  (`--load_only` measures just this);
* generation, ours (`Pipeline.latents` + `decode`) and diffusers' pipeline built from our
  loaded networks and the same scheduler, interleaved run for run after a short warm-up:
  text encoding, U-Net s/step (median call), step interval, VAE decode, whole batch, images
  per minute, time outside the three networks, peak memory (RSS on CPU via /proc VmHWM,
  reset per run; `max_memory_allocated` on CUDA);
* the U-Net called directly in a loop (same module, dtype and memory format);
  our pipeline and the direct loop run with the attention processor `load_model` set for the
  run (`library.models.attention`), diffusers' pipeline with diffusers' default `AttnProcessor2_0`;
* U-Net FLOPs per step (`FlopCounterMode`, CPU SDPA counted too) and achieved FLOP/s.

Times come from forward hooks on the shared networks, so both pipelines are timed the same
way. Results: a table on stdout, all figures in `--json PATH`. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.records.jobs import Job
from library.sampling.schedulers import make_scheduler
from tools.bench.common import (
    DEFAULT_CACHE,
    DTYPES,
    child_env,
    entry_command,
    flop_mapping,
    full_size_checkpoint,
    machine_info,
    peak_memory_gb,
    random_unet_inputs,
    read_into_page_cache,
    reset_peak_memory,
    round_order,
    synchronize,
)

logger = logging.getLogger(__name__)

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
SEED = 1234
GUIDANCE = 7.5
PROBE_TAG = "BENCH_PROBE "
# Figures measured for each pipeline, with table labels. All are positive.
FIGURES = {
    "text_encode_s": "text encoding (s)",
    "unet_s_per_step": "U-Net s/step (median call)",
    "step_s": "step interval (s, median)",
    "vae_decode_s": "VAE decode (s)",
    "whole_s": "whole batch (s)",
    "images_per_min": "images / minute",
    "outside_networks_s": "outside TE/U-Net/VAE (s)",
    "peak_memory_gb": "peak memory (GB)",
    "achieved_tflops": "U-Net achieved TFLOP/s",
}
LOAD_FIGURES = ("ours_s", "ours_resident_s", "safetensors_s", "safetensors_resident_s", "ours_peak_gb",
                "safetensors_peak_gb")

# --- model load (each measurement in a fresh process) ---------------------------------------


def probe_load(kind: str, path: Path, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Time one load in this process: `ours` (load_model) or `safetensors` (load_file alone).

    safetensors >= 0.6 returns tensors backed by a memory map of the file, read on first use
    (our loader keeps them when no cast is needed), so each side is timed twice: when the call
    returns, and once every weight is resident in the run's dtype (safetensors: cast where the
    dtype differs; both: one read per memory page). Imports happen before the clock starts.
    """
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (lazy modules: import now)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401

    import library.models.tokenizer  # noqa: F401
    from library.models import load_model

    reset_peak_memory(device)
    start = time.perf_counter()
    if kind == "ours":
        model = load_model(str(path), dtype=dtype, device=device)
        synchronize(device)
        returned = time.perf_counter()
        tensors = [t for m in (model.text_encoder, model.unet, model.vae) for t in m.state_dict().values()]
    else:
        loaded = load_file(str(path), device=str(device))
        synchronize(device)
        returned = time.perf_counter()
        tensors = [v.to(dtype) if v.is_floating_point() else v for v in loaded.values()]
    touch_pages(tensors)
    synchronize(device)
    resident = time.perf_counter()
    return {"seconds": returned - start, "resident_seconds": resident - start, "peak_gb": peak_memory_gb(device)}


def touch_pages(tensors: list[torch.Tensor]) -> None:
    """Read one element per 4 KiB page of every tensor, so memory-mapped weights are resident."""
    with torch.no_grad():
        for tensor in tensors:
            if tensor.numel():
                flat = tensor.detach().reshape(-1)
                flat[:: max(1, 4096 // tensor.element_size())].float().sum()


def measure_load(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median load figures over `--load_runs` interleaved child processes (safetensors, ours, ...)."""
    read_into_page_cache(path)  # both readers start from memory, not the disk
    runs: dict[str, list[dict[str, float]]] = {"safetensors": [], "ours": []}
    for _ in range(args.load_runs):
        for kind in runs:
            argv = entry_command("pipeline", "--probe", kind, "--ckpt", str(path), "--dtype", args.dtype,
                                 "--device", args.device)
            done = subprocess.run(argv, capture_output=True, text=True, check=False, env=child_env())
            lines = [line for line in done.stdout.splitlines() if line.startswith(PROBE_TAG)]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"load probe {kind} failed:\n{done.stderr[-2000:]}")
            runs[kind].append(json.loads(lines[-1][len(PROBE_TAG):]))
    med = lambda kind, key: statistics.median(r[key] for r in runs[kind])  # noqa: E731
    return {
        "ours_s": med("ours", "seconds"),
        "ours_resident_s": med("ours", "resident_seconds"),
        "safetensors_s": med("safetensors", "seconds"),
        "safetensors_resident_s": med("safetensors", "resident_seconds"),
        "ours_peak_gb": med("ours", "peak_gb"),
        "safetensors_peak_gb": med("safetensors", "peak_gb"),
        "file_gb": path.stat().st_size / 1e9,
        "dtype": args.dtype,
    }


# --- timing generation ----------------------------------------------------------------------


class Recorder:
    """Wall-clock intervals of calls into the shared networks (text encoder, U-Net, VAE decode).

    Both pipelines run the same module objects, so hooks on them time both the same way.
    """

    PARTS = ("text_encoder", "unet", "vae_decode")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.intervals: dict[str, list[tuple[float, float]]] = {p: [] for p in self.PARTS}
        self._open: dict[str, float] = {}

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def clear(self) -> None:
        self.intervals = {p: [] for p in self.PARTS}

    def start(self, part: str) -> None:
        self._open[part] = self.now()

    def stop(self, part: str) -> None:
        self.intervals[part].append((self._open.pop(part), self.now()))

    def attach(self, text_encoder: torch.nn.Module, unet: torch.nn.Module, vae: torch.nn.Module) -> None:
        """Hook the forwards of text encoder and U-Net, and wrap `vae.decode` on the instance."""
        # torch.compiler.disable: a compiled U-Net (--compile) runs its hooks as they are, untraced
        start, stop = torch.compiler.disable(self.start), torch.compiler.disable(self.stop)
        for part, module in (("text_encoder", text_encoder), ("unet", unet)):
            module.register_forward_pre_hook(lambda _m, _a, part=part: start(part))
            module.register_forward_hook(lambda _m, _a, _o, part=part: stop(part))
        original = vae.decode

        def timed_decode(*args, **kwargs):
            self.start("vae_decode")
            try:
                return original(*args, **kwargs)
            finally:
                self.stop("vae_decode")

        vae.decode = timed_decode

    def figures(self, start: float, end: float, images: int, device: torch.device) -> dict[str, Any]:
        """This run's figures (see `FIGURES`; every U-Net call too) from the recorded intervals;
        TFLOP/s is added by `median_figures`."""
        unet = self.intervals["unet"]
        calls = [e - s for s, e in unet]
        starts = [s for s, _ in unet]
        total = lambda part: sum(e - s for s, e in self.intervals[part])  # noqa: E731
        whole = end - start
        return {
            "text_encode_s": total("text_encoder"),
            "unet_s_per_step": statistics.median(calls),
            "unet_calls_s": calls,
            "unet_total_s": sum(calls),
            "steps": len(calls),
            "step_s": statistics.median(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else calls[0],
            "vae_decode_s": total("vae_decode"),
            "whole_s": whole,
            "images_per_min": 60.0 * images / whole,
            "outside_networks_s": whole - total("text_encoder") - sum(calls) - total("vae_decode"),
            "peak_memory_gb": peak_memory_gb(device),
        }


def make_jobs(args: argparse.Namespace, steps: int) -> list[Job]:
    """The benchmark's batch: one prompt, empty negative prompt, consecutive seeds."""
    return [Job(PROMPT, "", SEED + i, args.size, args.size, steps, GUIDANCE) for i in range(args.batch_size)]


def run_ours(gen, rec: Recorder, args: argparse.Namespace, steps: int) -> tuple[dict, torch.Tensor]:
    """One batch through `Pipeline.latents` + `decode`; images in [0, 1]."""
    rec.clear()
    reset_peak_memory(gen.device)
    start = rec.now()
    images = gen.decode(gen.latents(make_jobs(args, steps)), args.batch_size)
    end = rec.now()
    return rec.figures(start, end, args.batch_size, gen.device), (images / 2 + 0.5).clamp(0, 1)


def run_diffusers(pipe, rec: Recorder, args: argparse.Namespace, steps: int, v_pred: bool):
    """The same batch through diffusers' pipeline (fresh scheduler, same seeds and guidance)."""
    device = torch.device(args.device)
    pipe.scheduler = make_scheduler(args.sampler, v_pred)
    generators = [torch.Generator(device).manual_seed(SEED + i) for i in range(args.batch_size)]
    rec.clear()
    reset_peak_memory(device)
    start = rec.now()
    images = pipe(
        prompt=[PROMPT] * args.batch_size, negative_prompt=[""] * args.batch_size, height=args.size,
        width=args.size, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generators,
        output_type="pt",
    ).images
    end = rec.now()
    return rec.figures(start, end, args.batch_size, device), images.float().cpu()


def run_direct(unet, rec: Recorder, inputs: dict[str, torch.Tensor], timesteps: torch.Tensor) -> list[float]:
    """Seconds of each plain `unet(latent, t, encoder_hidden_states=...)` call, one per step."""
    rec.clear()
    with torch.no_grad():
        for t in timesteps:
            unet(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"])
    return [e - s for s, e in rec.intervals["unet"]]


def unet_inputs(unet, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random U-Net inputs shaped like one guided step of the batch (2 x batch rows)."""
    sample, context = random_unet_inputs(unet, 2 * args.batch_size, args.size // 8, dtype, torch.device(args.device))
    return {"sample": sample, "encoder_hidden_states": context}


def count_unet_flops(unet, inputs: dict[str, torch.Tensor], t: torch.Tensor) -> int:
    """FLOPs of one U-Net call, counting PyTorch's CPU SDPA kernel too (not in the stock table)."""
    from torch.utils.flop_counter import FlopCounterMode

    call = unet.forward if getattr(unet, "_compiled_call_impl", None) else unet  # compiled: count the eager graph
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        call(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"])
    return counter.get_total_flops()


# --- the benchmark --------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; return the JSON-ready result."""
    from diffusers import StableDiffusionPipeline

    from library.models import load_model
    from library.sampling.pipeline import Pipeline
    from library.text.encoder import PromptEncoder

    path = checkpoint_for(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    load = measure_load(path, args)
    model = load_model(str(path), dtype=dtype, device=device)
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:  # as gen_img's --compile: both pipelines then call the compiled U-Net and decoder
        from library.models.compiling import compile_networks

        compile_networks(model.unet, model.vae, device)
    v_pred = model.kind.v_prediction
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=model.kind.default_clip_skip)
    gen = Pipeline(unet=model.unet, vae=model.vae, encoder=encoder, sampler=args.sampler, v_prediction=v_pred,
                    device=device, dtype=dtype, noise_device=device, progress=False)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=make_scheduler(args.sampler, v_pred),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    use_attention = attention_switch(model.unet)
    rec = Recorder(device)
    rec.attach(model.text_encoder, model.unet, model.vae)
    scheduler = make_scheduler(args.sampler, v_pred)
    scheduler.set_timesteps(args.steps, device=device)
    inputs = unet_inputs(model.unet, args, dtype)

    warm = min(2, args.steps)
    logger.info("warm-up (%d steps each)", warm)
    use_attention("diffusers")
    run_diffusers(pipe, rec, args, warm, v_pred)
    use_attention("ours")
    run_ours(gen, rec, args, warm)
    run_direct(model.unet, rec, inputs, scheduler.timesteps[:warm])
    use_attention("diffusers")  # FLOPs of the standard computation (the same for both sides)
    flops = count_unet_flops(model.unet, inputs, scheduler.timesteps[0])

    # Interleaved, and which pipeline goes first alternates (ours, diffusers | diffusers, ours | ...)
    # so a drift in machine speed weighs on both alike; the direct loop closes each round.
    ours_runs, theirs_runs, direct = [], [], []
    for run in range(args.runs):
        for side in round_order(("ours", "diffusers"), run):
            logger.info("run %d/%d: %s", run + 1, args.runs, side)
            use_attention(side)
            if side == "ours":
                figures, ours_images = run_ours(gen, rec, args, args.steps)
                ours_runs.append(figures)
            else:
                figures, theirs_images = run_diffusers(pipe, rec, args, args.steps, v_pred)
                theirs_runs.append(figures)
        logger.info("run %d/%d: U-Net called directly", run + 1, args.runs)
        use_attention("ours")
        direct.append(run_direct(model.unet, rec, inputs, scheduler.timesteps))

    ours, theirs = median_figures(ours_runs, flops), median_figures(theirs_runs, flops)
    direct_s = statistics.median(statistics.median(calls) for calls in direct)
    ratios = {key: ours[key] / theirs[key] for key in FIGURES}
    ratios.update(load_ratios(load))
    ratios["unet_vs_direct"] = ours["unet_s_per_step"] / direct_s
    ratios["whole_vs_unet_x_steps"] = ours["whole_s"] / (ours["unet_s_per_step"] * args.steps)
    finite = bool(torch.isfinite(ours_images).all() and torch.isfinite(theirs_images).all())
    checks = {
        "images_finite": finite,
        "max_abs_diff_vs_diffusers": float((ours_images - theirs_images).abs().max()),
        "outside_unet_fraction": (ours["whole_s"] - ours["unet_total_s"]) / ours["unet_total_s"],
        "outside_networks_fraction": ours["outside_networks_s"] / ours["unet_total_s"],
        "unet_ratio_ok": ratios["unet_s_per_step"] <= 1.02,
        "unet_vs_direct_ok": ratios["unet_vs_direct"] <= 1.05,
        "load_ratio_ok": ratios["load_vs_safetensors"] <= 1.5,
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("probe", "json", "load_only")}
        | {"checkpoint": str(path)},
        "machine": machine_info(),
        "load": load,
        "ours": ours,
        "diffusers": theirs,
        "unet_direct": {"unet_s_per_step": direct_s, "achieved_tflops": flops / direct_s / 1e12},
        "flops": {"unet_per_step": flops, "unet_per_image_step": flops / args.batch_size},
        "ratios": ratios,
        "checks": checks,
        "runs": {"ours": ours_runs, "diffusers": theirs_runs, "unet_direct_calls_s": direct},
    }


def attention_switch(unet):
    """A function setting the shared U-Net's attention processors for one side of the comparison:
    "ours" = what `load_model` chose for the run (library.models.attention), "diffusers" = diffusers'
    default `AttnProcessor2_0` (what `StableDiffusionPipeline` uses on PyTorch 2)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    ours = unet.attn_processors

    def use(side: str) -> None:
        unet.set_attn_processor(dict(ours) if side == "ours" else AttnProcessor2_0())  # it pops the dict

    return use


def load_ratios(load: dict[str, float]) -> dict[str, float]:
    """ours / safetensors: weights resident in the run's dtype (the criterion), and as returned."""
    return {
        "load_vs_safetensors": load["ours_resident_s"] / load["safetensors_resident_s"],
        "load_returned_vs_safetensors": load["ours_s"] / load["safetensors_s"],
    }


def median_figures(runs: list[dict[str, Any]], flops: int) -> dict[str, float]:
    """Per-figure medians over runs, plus achieved U-Net FLOP/s from the median step."""
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "unet_calls_s"}
    out["achieved_tflops"] = flops / out["unet_s_per_step"] / 1e12
    return out


def checkpoint_for(args: argparse.Namespace) -> Path:
    """`--ckpt`, the tiny model (`--tiny`) or the cached full-size random checkpoint."""
    if args.ckpt:
        return Path(args.ckpt).expanduser()
    cache = Path(args.cache_dir).expanduser()
    if args.tiny:
        from library.models.tiny_files import make_tiny_models

        return make_tiny_models(cache / "tiny", ("sd1",))["sd1"]
    return full_size_checkpoint(cache)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report."""
    cfg, ours, theirs, ratios = result["config"], result["ours"], result["diffusers"], result["ratios"]
    lines = [
        f"{cfg['device']} {cfg['dtype']}{' channels-last' if cfg['channels_last'] else ''},"
        f" {cfg['size']}x{cfg['size']}, {cfg['steps']} steps {cfg['sampler']}, batch {cfg['batch_size']},"
        f" {cfg['runs']} runs;"
        f" {result['machine']['cpu']}, {result['machine']['torch_threads']} threads",
        f"{'figure':32} {'ours':>10} {'diffusers':>10} {'ours/diff':>10}",
    ]
    for key, label in FIGURES.items():
        lines.append(f"{label:32} {ours[key]:10.4g} {theirs[key]:10.4g} {ratios[key]:10.3f}")
    direct = result["unet_direct"]["unet_s_per_step"]
    lines.append(f"{'U-Net called directly s/step':32} {direct:10.4g} {'':10} {ratios['unet_vs_direct']:10.3f}"
                 "  (ours/direct)")
    lines += [
        f"U-Net GFLOPs per step: {result['flops']['unet_per_step'] / 1e9:.1f}",
        format_load(result["load"], ratios),
        f"whole / (U-Net s/step x steps): {ratios['whole_vs_unet_x_steps']:.3f}; time outside the U-Net "
        f"{100 * result['checks']['outside_unet_fraction']:.1f}% of U-Net time, outside all three networks "
        f"{100 * result['checks']['outside_networks_fraction']:.2f}%",
        f"images finite: {result['checks']['images_finite']}; max |ours - diffusers| (0..1 pixels): "
        f"{result['checks']['max_abs_diff_vs_diffusers']:.3g}",
    ]
    return "\n".join(lines)


def format_load(load: dict[str, Any], ratios: dict[str, float]) -> str:
    """One line about the model load."""
    return (
        f"load ({load['file_gb']:.2f} GB file, {load['dtype']}): weights resident: ours "
        f"{load['ours_resident_s']:.2f} s, safetensors load_file + cast {load['safetensors_resident_s']:.2f} s, ratio "
        f"{ratios['load_vs_safetensors']:.2f}; call returned: ours {load['ours_s']:.2f} s, load_file "
        f"{load['safetensors_s']:.3f} s; peak memory ours {load['ours_peak_gb']:.2f} GB, safetensors "
        f"{load['safetensors_peak_gb']:.2f} GB"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--channels_last", action="store_true", help="U-Net in channels-last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Net and VAE decoder as gen_img.py --compile does (in the warm-up)")
    parser.add_argument("--size", type=int, default=256, help="image width and height (default 256)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each pipeline (default 2)")
    parser.add_argument("--load_runs", type=int, default=2, help="load measurements of each kind (default 2)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="benchmark this single-file checkpoint instead")
    source.add_argument("--tiny", action="store_true", help="use the tiny test model (smoke runs)")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE),
                        help=f"where the full-size random checkpoint is kept (default {DEFAULT_CACHE})")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--load_only", action="store_true", help="measure the model load only")
    parser.add_argument("--probe", choices=["ours", "safetensors"], help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace) -> str | None:
    """Why these option values cannot run, or None."""
    if args.size % 8 or args.size < 8 or args.steps < 1 or args.batch_size < 1 or args.runs < 1 or args.load_runs < 1:
        return "--size must be a positive multiple of 8; --steps, --batch_size, --runs, --load_runs >= 1"
    return None


def command(args: argparse.Namespace) -> int:
    """Run the benchmark (or, with the hidden `--probe`, one load measurement); print the table."""
    if args.probe:  # child process of `measure_load`
        figures = probe_load(args.probe, Path(args.ckpt), DTYPES[args.dtype], torch.device(args.device))
        print(PROBE_TAG + json.dumps(figures), flush=True)
        return 0
    if args.load_only:
        load = measure_load(checkpoint_for(args), args)
        result: dict[str, Any] = {"load": load, "ratios": load_ratios(load), "machine": machine_info()}
        print(format_load(load, result["ratios"]))
    else:
        result = benchmark(args)
        print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
