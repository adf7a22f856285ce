"""SDXL's added conditioning: the size numbers of each U-Net row and the vector the U-Net builds."""

from __future__ import annotations

import math

import pytest
import torch

from library.records.jobs import Job
from library.records.size_conditioning import SizeConditioning
from library.sampling.added_conditioning import added_vector, time_ids, with_time_ids
from library.text.encoder import Conditioning


def _job(**kwargs) -> Job:
    return Job(**{"prompt": "a cat", "negative_prompt": "", "seed": 1, "width": 1024, "height": 768, "steps": 3,
                  "scale": 7.0, **kwargs})


def _sinusoid(value: float, width: int) -> torch.Tensor:
    """The hand formula in float32 (as SDXL computes it): [cos(v f_0) .. cos(v f_{h-1}),
    sin(v f_0) .. sin(v f_{h-1})], f_i = exp(-ln(10000) i / h), h = width / 2."""
    half = width // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor(value, dtype=torch.float32) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)])


@pytest.fixture(scope="module")
def unet():
    """A U-Net with SDXL's `text_time` embedding (8 numbers per size value, pooled width 12)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=(1, 1), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8,
    ).eval()


def test_the_vector_the_unet_builds_equals_the_hand_computation(unet):
    pooled = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[768.0, 1024.0, 0.0, 0.0, 768.0, 1024.0], [512.0, 640.0, 32.0, 16.0, 1024.0, 1024.0]])
    vector = added_vector(unet, pooled, ids)
    assert vector.shape == (2, 12 + 6 * 8)
    for row in range(2):
        expected = torch.cat([pooled[row], *(_sinusoid(v, 8) for v in ids[row].tolist())])
        assert torch.allclose(vector[row], expected, rtol=0, atol=1e-6)
    assert math.isclose(vector[1, 12 + 8 * 2].item(), math.cos(32.0), abs_tol=1e-6)  # crop top 32: cos first


def test_defaults_original_is_the_size_negative_original_is_the_original_crop_is_zero():
    assert SizeConditioning().time_ids(1024, 768) == (768, 1024, 0, 0, 768, 1024)
    sizes = SizeConditioning(original_height=2048, original_width=1536)
    assert sizes.time_ids(1024, 768) == (2048, 1536, 0, 0, 768, 1024)
    assert sizes.time_ids(1024, 768, negative=True) == (2048, 1536, 0, 0, 768, 1024)
    sizes = SizeConditioning(2048, 1536, 512, 384, 16, 8)
    assert sizes.time_ids(1024, 768) == (2048, 1536, 16, 8, 768, 1024)
    assert sizes.time_ids(1024, 768, negative=True) == (512, 384, 16, 8, 768, 1024)


def test_rows_follow_the_cfg_layout_and_change_only_with_the_sizes():
    jobs = [_job(sizes=SizeConditioning(2048, 1536, 512, 384, 16, 8)), _job(prompt="a dog", seed=2)]
    prompt_a, prompt_b = (2048, 1536, 16, 8, 768, 1024), (768, 1024, 0, 0, 768, 1024)
    negative_a = (512, 384, 16, 8, 768, 1024)
    assert time_ids(jobs, 1).tolist() == [list(prompt_a), list(prompt_b)]
    assert time_ids(jobs, 2).tolist() == [list(negative_a), list(prompt_b), list(prompt_a), list(prompt_b)]
    assert time_ids(jobs, 3).tolist() == [list(negative_a), list(prompt_b), list(prompt_a), list(prompt_b),
                                          list(negative_a), list(prompt_b)]
    other = [_job(prompt="x", negative_prompt="y", seed=9, steps=5, scale=3.0), jobs[1]]
    assert torch.equal(time_ids(other, 2), time_ids([_job(), jobs[1]], 2))  # text, seed, steps: no change


def test_with_time_ids_leaves_sd1_conditioning_alone():
    plain = Conditioning(torch.zeros(2, 77, 4))
    assert with_time_ids(plain, [_job()], 2) is plain
    sdxl = with_time_ids(Conditioning(torch.zeros(2, 77, 4), pooled=torch.zeros(2, 3)), [_job()], 2)
    assert sdxl.time_ids.tolist() == [[768, 1024, 0, 0, 768, 1024]] * 2


def test_highres_first_stage_scales_the_given_numbers_rounding_half_up():
    sizes = SizeConditioning(1023, 777, None, 301, 5, 0).scaled(0.5)
    assert sizes == SizeConditioning(512, 389, None, 151, 3, 0)  # int(x * 0.5 + 0.5)
    assert sizes.time_ids(512, 384, negative=True) == (512, 301 // 2 + 1, 3, 0, 384, 512)
