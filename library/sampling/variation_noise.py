"""Start noise with a variation seed, a seed resize, and ENSD: the web UI's seed extras.

- `slerp(v, low, high)`: spherical interpolation of two (C, h, w) noises, normalised along
  dim 1 (as the web UI does it): per (channel, column) the angle w between the two columns,
  `sin((1 - v) w) / sin w * low + sin(v w) / sin w * high`; when the mean cosine is above
  0.9995 (nearly equal noises, where sin w ~ 0) the linear `(1 - v) * low + v * high`.
  v = 0 gives `low` and v = 1 `high` exactly.
- `first_noise`: draw (1) of one image. The seed's noise and the subseed's (each from its own
  fresh generator when a resize is asked, else the seed's from the image's generator) are
  slerped; with a resize they are drawn at (C, H0/8, W0/8) and pasted centred (cropped when
  larger) into the full-size noise drawn by the image's own generator, so the image's stream
  is one full-size draw further along in every case and its later draws do not change.
- ENSD (`--eta_noise_seed_delta`): after draw (1) the image's generator is re-seeded with
  `seed + ENSD`; the later draws (the up-front ones, img2img noise, ancestral/SDE noise)
  change, the start noise does not.
"""

from __future__ import annotations

import torch

from library.records.variation_settings import Variation

LINEAR_ABOVE = 0.9995  # mean cosine above which slerp falls back to linear interpolation


def slerp(v: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (v = 0) to `high` (v = 1) along dim 1."""
    low_dir = low / torch.norm(low, dim=1, keepdim=True)
    high_dir = high / torch.norm(high, dim=1, keepdim=True)
    cos = (low_dir * high_dir).sum(1)
    if cos.mean() > LINEAR_ABOVE:
        return (1 - v) * low + v * high
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1.0 - v) * omega) / sin).unsqueeze(1) * low + (torch.sin(v * omega) / sin).unsqueeze(1) * high


def paste_centred(small: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (C, H, W) with `small` (C, h, w) pasted in its centre; a side larger than the
    full one is cropped to its centre."""
    out = full.clone()
    _, h, w = small.shape
    _, height, width = full.shape
    dy, dx = (height - h) // 2, (width - w) // 2
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    ph, pw = min(h, height), min(w, width)
    out[:, ty : ty + ph, tx : tx + pw] = small[:, sy : sy + ph, sx : sx + pw]
    return out


def _randn(seed: int, shape, device, dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def first_noise(seed: int, variation: Variation | None, shape: tuple[int, int, int],
                generator: torch.Generator, device, dtype, vae_scale: int = 8) -> torch.Tensor:
    """Draw (1) of one image: the seed's noise from `generator`, or with `variation` the
    slerped / resized noise described above (the generator makes one full-size draw either way)."""
    if variation is None or not variation.active:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    small = shape
    if variation.resize_from is not None:
        width, height = variation.resize_from
        small = (shape[0], height // vae_scale, width // vae_scale)
    if small != shape:
        noise = _randn(seed, small, device, dtype)
    else:
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if variation.varies:
        sub = _randn(variation.subseed, small, device, dtype)
        noise = slerp(variation.strength, noise.float(), sub.float()).to(dtype)
    if small != shape:
        noise = paste_centred(noise, torch.randn(shape, generator=generator, device=device, dtype=dtype))
    return noise


def reseeded(generator: torch.Generator, seed: int, delta: int) -> torch.Generator:
    """ENSD: a fresh generator seeded with `seed + delta` (the same one when delta is 0)."""
    if not delta:
        return generator
    return torch.Generator(device=generator.device).manual_seed(seed + delta)
