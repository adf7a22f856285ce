"""What the benchmarks share: the full-size random model, dtypes, timing order, memory, the record.

Every benchmark of `python -m tools.bench` imports this module; it imports none of them, so
there is no import circle. It holds:

* the full-size SD 1.5-shaped checkpoint with fixed random weights (`full_size_checkpoint`),
  written once into a cache folder (fp16, ~2.13 GB, LDM single-file layout via
  `library.models.ldm_export`): random weights cost exactly what real ones cost, and no
  download is needed;
* `alternating` and `timed`: interleaved measurements, so that a drift in machine speed
  weighs on every side alike;
* peak memory: the process's RSS high-water mark (`VmHWM`, reset per run) or CUDA's
  allocator peak;
* the record: `machine_info` (CPU model, versions, threads, date), `load_average`, and
  `spread` for report tables;
* `random_unet_inputs` (one guided step's shapes) and the FLOP counter's entry for PyTorch's
  CPU flash-attention kernel, which its stock table lacks.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("~/.cache/sdgen-bench")
CHECKPOINT_NAME = "sd15-shaped-random-v1-fp16.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NOISY_LOGGERS = {"diffusers": logging.ERROR, "transformers": logging.ERROR, "library": logging.ERROR,
                 "networks": logging.WARNING}

# SD 1.5 shapes: U-Net 320/640/1280/1280, VAE 128/256/512/512, CLIP ViT-L/14 text encoder.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)

T = TypeVar("T")


# --- the full-size checkpoint ---------------------------------------------------------------


def full_size_checkpoint(cache_dir: Path) -> Path:
    """The SD 1.5-shaped random checkpoint in `cache_dir`, written on first use (~2 GB fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.ldm_export import to_ldm_checkpoint

    path = cache_dir.expanduser() / CHECKPOINT_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing the full-size random checkpoint %s (once)", path)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    generator = torch.Generator().manual_seed(0)
    tensors = to_ldm_checkpoint(
        _random_weights(unet, generator), _random_weights(vae, generator),
        _random_weights(text_encoder, generator), dict(unet.config), "sd1",
    )
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def _random_weights(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp16 weights for a meta-device module: norm scales near 1, small biases, matrices and
    convolutions scaled by 1/sqrt(fan-in) so activations stay finite through the network."""
    out = {}
    for name, meta in module.state_dict().items():
        if not meta.is_floating_point():
            continue  # position-id buffers: the loader makes its own
        value = torch.randn(meta.shape, generator=generator)
        if meta.ndim == 1:
            value = 1.0 + 0.1 * value if name.endswith("weight") else 0.02 * value
        else:
            value /= math.sqrt(meta[0].numel())
        out[name] = value.to(torch.float16)
    return out


def checkpoint_path(ckpt: str | None, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """`ckpt` when given, else the cached full-size random checkpoint (written on first use)."""
    if ckpt:
        return Path(ckpt).expanduser()
    return full_size_checkpoint(Path(cache_dir))


def read_into_page_cache(path: Path) -> None:
    """Read the whole file once, so that every measured load starts from memory, not the disk."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """`--ckpt FILE` and `--cache_dir DIR` (where the full-size random checkpoint is kept)."""
    parser.add_argument("--ckpt", help="benchmark this single-file checkpoint instead of the random one")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE),
                        help=f"where the full-size random checkpoint is kept (default {DEFAULT_CACHE})")


# --- child processes ------------------------------------------------------------------------


def entry_command(subcommand: str, *args: str) -> list[str]:
    """The command line running `python -m tools.bench SUBCOMMAND ARGS` in a fresh interpreter
    (measurements that need a process of their own: loads, peak memory)."""
    return [sys.executable, "-m", "tools.bench", subcommand, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository on PYTHONPATH (children may run from any
    folder) plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


# --- timing ---------------------------------------------------------------------------------


def round_order(sides: Iterable[T], round_index: int) -> list[T]:
    """The sides in the order of round `round_index`: as given in even rounds, reversed in odd
    ones (a, b | b, a | a, b ...), so that a drift in machine speed, or a cache one side leaves
    warm for the next, weighs on every side alike."""
    order = list(sides)
    return order if round_index % 2 == 0 else order[::-1]


def alternating(sides: Iterable[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, side) for `rounds` rounds, each round in `round_order`."""
    order = list(sides)
    for i in range(rounds):
        for side in round_order(order, i):
            yield i, side


def timed(op: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call of `op` by `clock` (wall clock by default)."""
    start = clock()
    op()
    return clock() - start


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host timestamps mean finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory ---------------------------------------------------------------------------------


def proc_status_kib(key: str) -> int | None:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`, ...); None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass  # the peak then covers the whole process so far


def peak_memory_gb(device: torch.device) -> float:
    """Peak since `reset_peak_memory`: CUDA allocated bytes, or process RSS (VmHWM / ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kib = proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def maxrss_gb(ru_maxrss: int) -> float:
    """A child's peak RSS from its rusage (Linux reports KiB) in GB."""
    return ru_maxrss * 1024 / 1e9


# --- U-Net inputs and FLOPs -----------------------------------------------------------------


def random_unet_inputs(unet: torch.nn.Module, rows: int, side: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, text states) of fixed random values (seed 0) shaped like one U-Net call:
    `rows` rows (2 x batch for a guided step) of side x side latents and 77 text tokens."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=g).to(device, dtype)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return sample, context


def sdpa_flops(q, k, v, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of PyTorch's CPU flash-attention kernel (not in the stock table): Q K^T and P V."""
    batch, heads, q_len, dim = q
    return 2 * batch * heads * q_len * k[-2] * (dim + v[-1])


def flop_mapping() -> dict:
    """`FlopCounterMode(custom_mapping=...)` with the CPU SDPA kernel counted too."""
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}


# --- the record -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model (lscpu), versions, threads and the date, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), cpu)
    except OSError:
        pass
    import diffusers

    return {
        "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def load_average() -> float:
    """The 1-minute load average: how busy the machine was (timings need an idle one)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def spread(values: list[float], unit: str, digits: int = 2) -> str:
    """`median (min-max)` of the runs, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def setup_logging() -> None:
    """INFO lines of the benchmarks on stderr; the libraries' own chatter quieted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
