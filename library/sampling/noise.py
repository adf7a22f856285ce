"""Each image's random stream and its up-front draws: the noise half of the seed contract.

Each image owns one random stream (`torch.Generator` on the noise device, seeded with the
image's seed, which yields exactly what `torch.manual_seed(seed)` makes the global stream
yield). From it, in this order: (1) the initial latent noise; (2) steps x noises-per-step
latent-shaped noises, which the original draws up front and never uses (drawn anyway, the
later draws depend on them); (3) for img2img, the noise added to the source latent; (4) for
img2img, the VAE posterior sample; (5) every noise an ancestral sampler asks for. A variation
seed or seed resize changes draw (1) and ENSD re-seeds the stream after it
(`library.sampling.variation_noise`). Because no stream is shared, an image never depends on
its batch mates. The seeds themselves are chosen in `library.prompts.seeds`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from library.records.variation_settings import Variation


@dataclass
class ImageNoise:
    """The noise of one batch: per-image generators and the up-front draws (1)-(3)."""

    generators: list[torch.Generator]
    initial: torch.Tensor  # (B, C, h, w): draw (1) of each image
    img2img: torch.Tensor | None  # (B, C, h, w): draw (3), or None for txt2img


def draw_image_noise(
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    *,
    steps: int,
    noises_per_step: int,
    img2img: bool,
    device: torch.device,
    dtype: torch.dtype,
    modify: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    variations: Sequence[Variation | None] | None = None,
    eta_noise_seed_delta: int = 0,
) -> ImageNoise:
    """Seed one generator per image and make its up-front draws in the original's order;
    `modify` (`library.sampling.start_noise`) then changes each start noise with draws from its stream.
    Draw (1) follows each image's variation seed / seed resize, and with `eta_noise_seed_delta`
    the image's stream is re-seeded after it (`library.sampling.variation_noise`)."""
    import torch  # here, not at the top: prompt files are read and checked before torch loads

    from library.sampling.variation_noise import first_noise, reseeded

    generators, initial, extra = [], [], []
    for index, seed in enumerate(seeds):
        g = torch.Generator(device=device).manual_seed(seed)
        variation = variations[index] if variations is not None else None
        initial.append(first_noise(seed, variation, latent_shape, g, device, dtype))
        g = reseeded(g, seed, eta_noise_seed_delta)
        for _ in range(steps * noises_per_step):  # drawn and unused, as the original
            torch.randn(latent_shape, generator=g, device=device, dtype=dtype)
        if img2img:
            extra.append(torch.randn(latent_shape, generator=g, device=device, dtype=dtype))
        if modify is not None:
            initial[-1] = modify(initial[-1], g)
        generators.append(g)
    return ImageNoise(generators, torch.stack(initial), torch.stack(extra) if img2img else None)
