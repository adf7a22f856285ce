"""SDXL's added conditioning: the pooled text vector and six size numbers per U-Net row.

SDXL's U-Net (diffusers' `addition_embed_type="text_time"`) adds to its timestep embedding a
vector of 2816 numbers per row: ``[pooled (1280), emb(original h), emb(original w),
emb(crop top), emb(crop left), emb(target h), emb(target w)]``, each `emb` a sinusoid of
`unet.config.addition_time_embed_dim` numbers (256), ordered ``[cos, sin]`` with frequencies
``exp(-ln(10000) * i / 128)``. The U-Net builds the sinusoids itself from `time_ids` (its
`add_time_proj`), so a row's conditioning is its pooled vector (`Conditioning.pooled`) and its
six numbers (`Conditioning.time_ids`); `added_vector` shows the whole vector (tests, docs).

Rows follow the CFG layout (`library.sampling.pipeline.CFG`): the prompt rows get the image's
original size, the negative rows (and, with a negative scale, the empty prompt's rows, the
other unconditional side) get the negative original size; crop and target are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from library.records.jobs import Job
from library.records.size_conditioning import SizeConditioning
from library.text.encoder import Conditioning

#: Which rows of each CFG layout (by `copies`) are unconditional: they take the negative sizes.
_UNCONDITIONAL = {1: (False,), 2: (True, False), 3: (True, False, True)}


def time_ids(jobs: Sequence[Job], copies: int) -> torch.Tensor:
    """The (copies * len(jobs), 6) size numbers of a batch's rows, in CFG order."""
    rows = []
    for negative in _UNCONDITIONAL[copies]:
        for job in jobs:
            rows.append((job.sizes or SizeConditioning()).time_ids(job.width, job.height, negative))
    return torch.tensor(rows, dtype=torch.float32)


def with_time_ids(cond: Conditioning, jobs: Sequence[Job], copies: int) -> Conditioning:
    """`cond` with its rows' size numbers; unchanged without a pooled vector (SD 1.x/2.x)."""
    if cond.pooled is None:
        return cond
    ids = time_ids(jobs, copies).to(cond.pooled.device, cond.pooled.dtype)
    return Conditioning(cond.states, cond.per_layer, cond.parts, cond.pooled, ids)


def added_vector(unet: torch.nn.Module, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The (rows, pooled + 6 * width) vector the U-Net's `text_time` embedding projects, built as
    the U-Net builds it from `pooled` and the size numbers `ids`."""
    embedded = unet.add_time_proj(ids.flatten()).reshape(ids.shape[0], -1)
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=-1)
