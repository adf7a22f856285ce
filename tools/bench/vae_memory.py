"""Peak memory of a full-size SD VAE decode (or encode): one piece, `--vae_slices`, `--vae_tiling`.

    python -m tools.bench vae-memory                      # decode 1024x1024: plain vs 16 slices vs tiling
    python -m tools.bench vae-memory --size 768 --slices 8 --encode

Each variant runs in its own fresh Python process, so its peak resident memory (VmHWM in
/proc/self/status, Linux) belongs to it alone. The VAE is SD's full-size architecture
(block_out_channels 128,256,512,512, two layers per block) with random weights (seed 0),
so no download is needed; memory and time do not depend on the weights. The report lists
the peak, the rise over the process's memory before the VAE call (the VAE's working
memory), the time, and the largest difference of each variant's image from the one-piece
result (0..255 scale).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from tools.bench.common import SD15_VAE, child_env, entry_command, proc_status_kib


def _status_mib(key: str) -> float:
    """A /proc/self/status memory figure in MiB (Linux only)."""
    kib = proc_status_kib(key)
    if kib is None:
        raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")
    return kib / 1024


def child(variant: str, size: int, slices: int, encode: bool, out: Path | None) -> dict:
    """Run one variant in this process and return its numbers."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from library.sampling.vae_slices import sliced_decode, sliced_encode_moments

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
    if variant == "tiling":
        vae.enable_tiling()
    generator = torch.Generator().manual_seed(1)
    if encode:
        x = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    else:
        x = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if encode and variant == "slices":
            result = sliced_encode_moments(vae, x, slices)
        elif encode:
            result = vae.encode(x).latent_dist.parameters
        else:
            result = sliced_decode(vae, x, slices) if variant == "slices" else vae.decode(x).sample
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    if out is not None:
        np.save(out, result.float().numpy())
    return {"variant": variant, "before_mib": round(before), "peak_mib": round(peak),
            "rise_mib": round(peak - before), "seconds": round(seconds, 1)}


def measure(variant: str, size: int = 1024, slices: int = 16, encode: bool = False,
            out: Path | None = None, threads: int | None = None) -> dict:
    """Run `child` in a fresh interpreter and return its numbers."""
    cmd = entry_command("vae-memory", "--child", variant, "--size", str(size), "--slices", str(slices),
                        *(["--encode"] if encode else []), *(["--out", str(out)] if out else []))
    env = child_env(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(variants: list[str], size: int, slices: int, encode: bool, threads: int | None = None) -> list[dict]:
    """Measure every variant; add each one's largest difference from "plain"."""
    import numpy as np

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            path = Path(tmp) / f"{variant}.npy"
            results.append(measure(variant, size, slices, encode, path, threads))
        if "plain" in variants:
            ref = np.load(Path(tmp) / "plain.npy")
            scale = 1.0 if encode else 127.5  # images in [-1, 1] -> 0..255 levels
            for r in results:
                r["max_diff"] = float(np.abs(np.load(Path(tmp) / f"{r['variant']}.npy") - ref).max() * scale)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (see the module docstring)."""
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--slices", type=int, default=16, help="--vae_slices value (default 16)")
    parser.add_argument("--encode", action="store_true", help="measure the encoder instead of the decoder")
    parser.add_argument("--variants", default="plain,slices,tiling", help="comma-separated: plain, slices, tiling")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def command(args: argparse.Namespace) -> int:
    """Compare the variants (each in a child process) and print one line each; or, as that child
    (`--child`), measure one variant and print its figures as JSON."""
    if args.child:
        print(json.dumps(child(args.child, args.size, args.slices, args.encode, args.out)))
        return 0
    what = "encode" if args.encode else "decode"
    print(f"full-size SD VAE, {what} {args.size}x{args.size}, fp32, CPU")
    for r in compare(args.variants.split(","), args.size, args.slices, args.encode, args.threads):
        label = f"slices={args.slices}" if r["variant"] == "slices" else r["variant"]
        diff = f"  max diff {r['max_diff']:.3g}" if "max_diff" in r else ""
        print(f"  {label:<10} peak {r['peak_mib']:>6} MiB  rise {r['rise_mib']:>6} MiB  {r['seconds']:>6} s{diff}")
    return 0

