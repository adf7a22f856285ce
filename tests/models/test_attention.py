"""library.models.attention: blocked attention equals SDPA, and the processor is set once at load time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from library.models.attention import BlockedAttnProcessor, blocked_attention, set_attention
from library.records.jobs import Job
from library.models import load_model
from tests.helpers import make_pipeline


def _qkv(tokens: int, keys: int, dim: int, dtype: torch.dtype, logit_scale: float = 1.0):
    g = torch.Generator().manual_seed(tokens + keys + dim)
    make = lambda n: torch.randn(2, n, 4, dim, generator=g).to(dtype).transpose(1, 2)  # noqa: E731  diffusers' layout
    q, k, v = make(tokens), make(keys), make(keys)
    return (q * logit_scale).to(dtype), k, v


@pytest.mark.parametrize("tokens,keys,dim,block", [(300, 300, 40, 128 * 300), (64, 77, 80, 1 << 21), (257, 1000, 16, 100 * 1000)])
def test_blocked_attention_equals_sdpa_in_fp32(tokens, keys, dim, block):
    q, k, v = _qkv(tokens, keys, dim, torch.float32, logit_scale=3.0)
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    got = blocked_attention(q, k, v, block_scores=block)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 2e-5  # fp32 rounding of differently ordered sums


def _relative_rms(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.float() - truth).pow(2).mean().sqrt() / truth.pow(2).mean().sqrt()).item()


def test_blocked_attention_in_bf16_is_close_to_the_exact_result():
    """bf16: the shifted scores keep the error within ~2.5x of the flash kernel's (fp32 scores),
    and well below plain bf16 scores (diffusers' classic processor rounds them unshifted)."""
    q, k, v = _qkv(1024, 1024, 40, torch.bfloat16, logit_scale=3.0)
    truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    flash = _relative_rms(F.scaled_dot_product_attention(q, k, v).transpose(1, 2), truth)
    plain = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 40**-0.5, dim=-1) @ v
    plain_error = _relative_rms(plain.transpose(1, 2), truth)
    blocked_error = _relative_rms(blocked_attention(q, k, v, 256 * 1024), truth)
    assert blocked_error < 2.5 * flash
    assert blocked_error < 0.5 * plain_error


def _unet_output(unet, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=context).sample.float()


def test_processor_in_the_unet_gives_the_sdpa_result(tiny_models):
    model = load_model(str(tiny_models["sd1"]))
    unet = model.unet
    unet.set_attn_processor(AttnProcessor2_0())
    expected = _unet_output(unet, torch.float32)
    unet.set_attn_processor(BlockedAttnProcessor(block_scores=100 * 77, min_tokens=1, dtypes=(torch.float32,)))
    assert (_unet_output(unet, torch.float32) - expected).abs().max().item() < 1e-5


def test_masked_and_short_calls_go_to_sdpa():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 300, 32)
    mask = torch.zeros(2, 1, 300)
    mask[:, :, 150:] = -10000.0
    proc = BlockedAttnProcessor(min_tokens=1, dtypes=(torch.float32,))
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {}):
            expected = AttnProcessor2_0()(attn, x, **kwargs)
            assert (proc(attn, x, **kwargs) - expected).abs().max().item() < 1e-5
    assert not proc.blocked_applies(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), mask)
    assert not BlockedAttnProcessor().blocked_applies(torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16),
                                                      torch.zeros(1, 1, 77, 8, dtype=torch.bfloat16), None)


class _ExactAttention(BlockedAttnProcessor):
    """Attention computed in fp32 from the run's q, k, v: the reference for bf16 runs."""

    def blocked_applies(self, query, key, mask) -> bool:
        return False

    def __call__(self, attn, hidden_states, *args, **kwargs):
        original = F.scaled_dot_product_attention

        def in_fp32(q, k, v, **kw):
            return original(q.float(), k.float(), v.float(), **kw).to(q.dtype)

        F.scaled_dot_product_attention = in_fp32
        try:
            return super().__call__(attn, hidden_states, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = original


def _images(model, dtype: torch.dtype, processors: dict) -> dict[str, torch.Tensor]:
    pipeline = make_pipeline(model, "ddim")
    pipeline.dtype = dtype
    jobs = [Job("a red cube on a table", "blurry", seed=7, width=128, height=128, steps=3, scale=7.0)]
    images = {}
    for name, proc in processors.items():
        model.unet.set_attn_processor(proc)
        images[name] = (pipeline.decode(pipeline.latents(jobs), 1) / 2 + 0.5).clamp(0, 1)
    return images


def test_fp32_images_with_blocked_attention_are_within_one_level(tiny_models):
    """Every attention layer of the tiny model computed blocked (a 128x128 image): within
    1/255 of diffusers' SDPA processor (in fact within ~1e-6)."""
    model = load_model(str(tiny_models["sd1"]))
    images = _images(model, torch.float32, {
        "sdpa": AttnProcessor2_0(),
        "blocked": BlockedAttnProcessor(block_scores=96 * 256, min_tokens=1, dtypes=(torch.float32,)),
    })
    assert (images["blocked"] - images["sdpa"]).abs().max().item() <= 1 / 255


def test_bf16_images_with_blocked_attention_are_as_close_to_exact_as_sdpa(tiny_models):
    """In bf16 the U-Net amplifies any change of rounding: attention computed exactly (fp32)
    already moves the tiny model's image by up to ~16/255 (mean ~2/255) from bf16 SDPA's.
    So bf16 is held to the exact-attention image: blocked must be about as close as SDPA."""
    model = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16)
    images = _images(model, torch.bfloat16, {
        "exact": _ExactAttention(),
        "sdpa": AttnProcessor2_0(),
        "blocked": BlockedAttnProcessor(block_scores=96 * 256, min_tokens=1),
    })
    error = {name: (images[name] - images["exact"]).abs() for name in ("sdpa", "blocked")}
    assert error["blocked"].mean().item() <= 1.25 * error["sdpa"].mean().item()
    assert error["blocked"].max().item() <= 1.5 * error["sdpa"].max().item()


def test_set_attention_modes(tiny_models):
    model = load_model(str(tiny_models["sd1"]))  # fp32 on the CPU: auto leaves SDPA
    kinds = lambda: {type(p).__name__ for p in model.unet.attn_processors.values()}  # noqa: E731
    assert kinds() == {"AttnProcessor2_0"}
    assert set_attention(model.unet, "blocked") == "blocked" and kinds() == {"BlockedAttnProcessor"}
    assert set_attention(model.unet, "sdpa") == "sdpa" and kinds() == {"AttnProcessor2_0"}
    with pytest.raises(ValueError):
        set_attention(model.unet, "flash")
    bf16 = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16)
    assert {type(p).__name__ for p in bf16.unet.attn_processors.values()} == {"BlockedAttnProcessor"}
    kept = load_model(str(tiny_models["sd1"]), dtype=torch.bfloat16, attention="sdpa")
    assert {type(p).__name__ for p in kept.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_worker_threads_give_the_single_thread_result():
    """With 2 torch threads the heads are shared by 2 Python threads (ops single-threaded):
    the same numbers as one thread, and the thread count is restored."""
    q, k, v = _qkv(600, 600, 40, torch.bfloat16, logit_scale=2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = blocked_attention(q, k, v, 200 * 600)
        torch.set_num_threads(2)
        shared = blocked_attention(q, k, v, 200 * 600)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, shared)


def test_worker_threads_run_in_the_callers_inference_mode():
    """Under `torch.inference_mode()` the output is an inference tensor; the worker threads
    (which do not inherit torch's per-thread modes) must write it in that mode too. The
    result equals the no_grad one, and the mode of the calling thread is unchanged."""
    q, k, v = _qkv(600, 600, 40, torch.bfloat16, logit_scale=2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            plain = blocked_attention(q, k, v, 200 * 600)
        with torch.inference_mode():
            inferred = blocked_attention(q, k, v, 200 * 600)
            assert torch.is_inference_mode_enabled()
    finally:
        torch.set_num_threads(before)
    assert inferred.is_inference()
    assert torch.equal(plain, inferred)
