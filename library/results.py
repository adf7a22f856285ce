"""What a run produced: NaN checks on its tensors, the summary line and the exit status.

A NaN or infinity in the latents (an fp16 overflow, an extreme guidance scale) would be
clamped to a black picture and saved as if it were a result; `check_latents` stops the run
at the step where it appears instead, and `check_pixels` catches one that the VAE made.
A run that wrote no image because its prompt lines were all skipped exits with status 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from library.errors import NonFiniteResult
from library.messages import one_line

if TYPE_CHECKING:
    import torch

_ADVICE = "lower the guidance scale or prompt weights, or compute in fp32 (no --fp16/--bf16)"


def check_latents(latents: "torch.Tensor", step: int, steps: int) -> None:
    """Raise `NonFiniteResult` naming the step if `latents` hold NaN or infinity."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteResult(f"the latents became NaN/infinite at step {step + 1} of {steps}; no image saved "
                              f"for this batch; {_ADVICE}")


def check_pixels(pixels: "torch.Tensor") -> "torch.Tensor":
    """`pixels`, or `NonFiniteResult` if the decoded images hold NaN or infinity."""
    import torch

    if not bool(torch.isfinite(pixels).all()):
        raise NonFiniteResult(f"the VAE decoded NaN/infinite pixels; no image saved for this batch; try "
                              f"--no_half_vae, or {_ADVICE}")
    return pixels


def summary_line(summary) -> str:
    """The last line of a run: images written (or none), lines skipped and why, time per step."""
    count = len(summary.written)
    skipped = ""
    if summary.skipped_lines:
        lines = f"{summary.skipped_lines} prompt line{'' if summary.skipped_lines == 1 else 's'}"
        skipped = f"{lines} skipped (first: {one_line(summary.first_skip or '', 240)})"
    if not count and skipped:
        return f"no image written: {skipped}"
    rate = f", {summary.seconds / summary.steps:.2f} s/it" if summary.steps else ""
    text = f"{count} image{'' if count == 1 else 's'} written in {summary.seconds:.1f} s{rate}"
    return f"{text}; {skipped}" if skipped else text


def exit_status(summary) -> int:
    """0 when an image was written (or nothing was asked for), 1 when every line was skipped."""
    return 1 if not summary.written and summary.skipped_lines else 0
