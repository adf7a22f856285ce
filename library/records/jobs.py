"""A `Job` is everything that decides one image; batching is grouping Jobs.

Jobs are plain frozen records made up front (seeds included), so a batch can never change
what an image looks like: images whose `batch_key` is equal may share a U-Net call, and
each image keeps its own noise stream (`library.prompts.seeds`).

img2img images carry their source (and mask) file and strength: different sources of one
size share a batch, different strengths or masked/unmasked images do not (one schedule
and one loop per batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from library.records.deep_shrink_settings import DeepShrink
    from library.records.extra_networks import HypernetUse, LoraUse
    from library.records.gradual_latent_settings import GradualLatent
    from library.records.size_conditioning import SizeConditioning
    from library.records.variation_settings import Variation


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    scale: float
    negative_scale: float | None = None
    chunks: int = 1  # 75-token chunks of the text embeddings (shared within a batch)
    raw_prompt: str | None = None
    clip_prompt: str | None = None
    file_name: str | None = None
    network_multipliers: tuple[float, ...] | None = None
    # img2img strength, or the Highres fix 2nd stage's; None for txt2img
    strength: float | None = None
    init_image: str | None = None  # img2img source file
    mask_image: str | None = None  # inpainting mask file (white = repaint)
    guide_image: str | None = None  # ControlNet hint source file; None: no ControlNet for this image
    control_guides: tuple[str, ...] = ()  # one guide per ControlNet (several ControlNets); (): guide_image for all
    deep_shrink: DeepShrink | None = None  # `library.features.deep_shrink` settings of this image
    gradual_latent: GradualLatent | None = None  # `library.features.gradual_latent` settings of this image
    prompt_parts: tuple[str, ...] = ()  # the prompt split at ` AND ` (attention couple); () for one part
    sizes: SizeConditioning | None = None  # SDXL's original / crop sizes (`library.records.size_conditioning`)
    # variation seed / seed resize (`library.sampling.variation_noise`): only the start noise, so not in `batch_key`
    variation: Variation | None = None
    sampler: str | None = None  # the line's `--sa`; None: the run's `--sampler`
    highres_scale: float | None = None  # the line's `--hfs`; None: the run's `--highres_fix_scale`
    loras: tuple[LoraUse, ...] = ()  # the prompt's `<lora:...>` tags (`library.prompts.extra_networks`)
    hypernetworks: tuple[HypernetUse, ...] = ()  # `--hypernetwork` and the prompt's `<hypernet:...>` tags
    # position in the run (0-based, across rounds): the number in the file name, the same in any process
    index: int = 0

    def batch_key(self) -> tuple:
        """Images with equal keys can be generated in one batch."""
        return (
            self.width,
            self.height,
            self.steps,
            self.scale,
            self.negative_scale,
            self.chunks,
            self.network_multipliers,
            self.strength,
            self.init_image is not None,
            self.mask_image is not None,
            self.guide_image is not None,
            self.deep_shrink,
            self.gradual_latent,
            len(self.prompt_parts),
            self.sizes,
            self.sampler,
            self.highres_scale,
            self.loras,
            self.hypernetworks,
        )


def batches(jobs: Iterable[Job], batch_size: int) -> Iterator[list[Job]]:
    """Consecutive jobs with equal `batch_key`, at most `batch_size` at a time."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) == batch_size or job.batch_key() != batch[0].batch_key()):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch
