"""Prompt editing and alternation in the loop: each U-Net call's text states.

A batch's prompts may change per step (`library.text.prompt_editing`: ``[from:to:when]``,
``[a|b]``, in the prompt, its ` AND ` parts and the negative prompt). The loop's schedule is
its own: the steps are the ones this loop runs (img2img and the Highres fix 2nd stage: the
steps of their tail, counted from 1), so ``[a:b:0.5]`` switches halfway through what is run.
A sampler that calls the U-Net more than once per step (Heun, DPM2) keeps a call's step.

Steps whose texts are the same for every row share one encoding (a prompt without editing
is encoded once, as before). Rows are padded to the chunk count that the longest text of
the batch needs, at least the Jobs' own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from library.records.jobs import Job
from library.text.prompt_editing import distinct_texts, has_editing, text_at


def call_steps(calls: int, full_calls: int, steps: int) -> list[tuple[int, int]]:
    """(step, of steps) of each of the loop's `calls` U-Net calls; `full_calls` U-Net calls make
    `steps` steps in the full schedule (more than `steps` for two-call samplers)."""
    own = max(1, round(calls * steps / full_calls)) if full_calls else calls
    return [(min(own, i * own // calls + 1), own) for i in range(calls)]


def edited(jobs: tuple[Job, ...]) -> bool:
    """Whether any prompt of `jobs` changes during the loop."""
    return any(has_editing(text) for j in jobs for text in (j.prompt, j.negative_prompt, *j.prompt_parts))


def jobs_at(jobs: tuple[Job, ...], step: int, steps: int, chunks: int) -> tuple[Job, ...]:
    """`jobs` with their prompts' texts at `step` of `steps`, padded to `chunks` chunks."""
    return tuple(replace(j, prompt=text_at(j.prompt, step, steps),
                         negative_prompt=text_at(j.negative_prompt, step, steps),
                         prompt_parts=tuple(text_at(p, step, steps) for p in j.prompt_parts), chunks=chunks)
                 for j in jobs)


def step_conditionings(jobs: tuple[Job, ...], calls: int, full_calls: int,
                       encode: Callable[[tuple[Job, ...]], object], chunk_count: Callable[..., int]) -> list:
    """One conditioning per U-Net call (`encode(jobs)` once per distinct set of texts)."""
    if not edited(jobs):
        cond = encode(jobs)
        return [cond] * calls
    plan = call_steps(calls, full_calls, jobs[0].steps)
    own = plan[0][1] if plan else 1
    texts = distinct_texts([t for j in jobs for t in (j.prompt, j.negative_prompt, *j.prompt_parts)], own)
    chunks = max(jobs[0].chunks, chunk_count(*texts))
    encoded: dict[tuple, object] = {}
    out = []
    for step, steps in plan:
        resolved = jobs_at(jobs, step, steps, chunks)
        key = tuple((j.prompt, j.negative_prompt, j.prompt_parts) for j in resolved)
        if key not in encoded:
            encoded[key] = encode(resolved)
        out.append(encoded[key])
    return out
