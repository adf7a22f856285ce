"""Prompt editing in the loop: the text states each U-Net call gets, and whole images."""

from __future__ import annotations

import pytest
import torch

from library.records.jobs import Job
from library.sampling.patches import FixedFeature, Patch
from tests.helpers import make_pipeline, run


class StatesRecorder(Patch):
    """Records the text states of every U-Net call."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def unet_kwargs(self, ctx, sample, timestep, cond):
        self.states.append(cond.states.clone())
        return None


def _job(prompt: str, negative: str = "", steps: int = 6) -> Job:
    return Job(prompt=prompt, negative_prompt=negative, seed=7, width=64, height=64, steps=steps, scale=5.0)


def _run(sd1, *jobs: Job, sampler: str = "euler"):
    recorder = StatesRecorder()
    pipeline = make_pipeline(sd1, sampler, FixedFeature(recorder))
    encodings = []
    real = pipeline._conditioning
    pipeline._conditioning = lambda j, cfg, r=None: encodings.append([x.prompt for x in j]) or real(j, cfg, r)
    latents = pipeline.latents(list(jobs))
    return latents, recorder.states, encodings, pipeline.encoder


def _cfg_states(encoder, prompt: str, negative: str = "") -> torch.Tensor:
    return torch.cat([encoder.encode([negative], 1), encoder.encode([prompt], 1)])


@pytest.mark.parametrize("prompt", ["a cat [dog:bird:3]", "a cat [dog:bird:0.5]"])
def test_editing_uses_from_for_steps_1_to_3_and_to_after(sd1, prompt):
    _, states, encodings, encoder = _run(sd1, _job(prompt))
    dog, bird = _cfg_states(encoder, "a cat dog"), _cfg_states(encoder, "a cat bird")
    assert [torch.equal(s, dog) for s in states] == [True] * 3 + [False] * 3
    assert [torch.equal(s, bird) for s in states] == [False] * 3 + [True] * 3
    assert encodings == [["a cat dog"], ["a cat bird"]]  # equal steps encoded once


def test_alternation_and_negative_prompt_editing(sd1):
    _, states, _, encoder = _run(sd1, _job("[red|blue] ball", negative="[ugly::2]"))
    expected = [_cfg_states(encoder, f"{c} ball", "ugly" if s < 2 else "")
                for s, c in enumerate(["red", "blue"] * 3)]
    assert all(torch.equal(a, b) for a, b in zip(states, expected, strict=True))


def test_edge_values_equal_the_plain_prompts_bit_for_bit(sd1):
    assert torch.equal(_run(sd1, _job("a [cat:dog:0] x"))[0], _run(sd1, _job("a dog x"))[0])
    assert torch.equal(_run(sd1, _job("a [cat:dog:100] x"))[0], _run(sd1, _job("a cat x"))[0])


def test_a_plain_prompt_is_encoded_once_as_before(sd1):
    _, states, encodings, encoder = _run(sd1, _job("a (cat:1.2) [weak] BREAK dog"))
    assert encodings == [["a (cat:1.2) [weak] BREAK dog"]]
    assert all(torch.equal(s, _cfg_states(encoder, "a (cat:1.2) [weak] BREAK dog")) for s in states)


def test_editing_in_a_batch_changes_only_its_image(sd1):
    edited, plain = _job("a [cat:dog:3]"), _job("a bird")
    together = _run(sd1, edited, plain)[0]
    beside_plain_cat = _run(sd1, _job("a cat"), plain)[0]  # the same batch shape, no editing
    assert torch.equal(together[1:], beside_plain_cat[1:])
    assert not torch.equal(together[:1], beside_plain_cat[:1])


def test_highres_fix_stages_run_their_own_schedules(tiny_models, tmp_path, monkeypatch):
    from library.sampling.pipeline import Pipeline

    encoded, real = [], Pipeline._conditioning
    monkeypatch.setattr(Pipeline, "_conditioning",
                        lambda self, jobs, cfg, r=None: encoded.append(jobs[0].prompt) or real(self, jobs, cfg, r))
    assert run(tiny_models, tmp_path / "edit", "--prompt", "a [cat:dog:0.5] --d 2", "--W", "128", "--H", "128",
               "--highres_fix_scale", "0.5", "--highres_fix_steps", "4", "--steps", "4", "--strength", "0.5",
               "--sampler", "ddim") == 0
    # 1st stage: 4 steps, cat for 2; 2nd stage: the 2 steps it runs, cat for 1 (the tail of 4 would be all dog)
    assert encoded == ["a cat", "a dog", "a cat", "a dog"]
