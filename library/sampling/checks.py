"""NaN checks on a batch's tensors: never save a black picture as if it were a result.

A NaN or infinity in the latents (an fp16 overflow, an extreme guidance scale) would be
clamped to a black picture; `check_latents` stops the batch at the step where it appears
instead, and `check_pixels` catches one that the VAE made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from library.errors import NonFiniteResult

if TYPE_CHECKING:
    import torch

_ADVICE = "lower the guidance scale or prompt weights, or compute in fp32 (no --fp16/--bf16)"


def check_latents(latents: torch.Tensor, step: int, steps: int) -> None:
    """Raise `NonFiniteResult` naming the step if `latents` hold NaN or infinity."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteResult(f"the latents became NaN/infinite at step {step + 1} of {steps}; no image saved "
                              f"for this batch; {_ADVICE}")


def check_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """`pixels`, or `NonFiniteResult` if the decoded images hold NaN or infinity."""
    import torch

    if not bool(torch.isfinite(pixels).all()):
        raise NonFiniteResult(f"the VAE decoded NaN/infinite pixels; no image saved for this batch; try "
                              f"--no_half_vae, or {_ADVICE}")
    return pixels
