"""Faster exact attention for the U-Net on CPUs: `BlockedAttnProcessor`, set once per model.

On the CPU, PyTorch's scaled-dot-product attention runs its flash kernel, which for the
U-Net's self-attention (1024-4096 tokens, 40-80 channels per head) reaches ~160 GFLOP/s in
bf16 on the 2-core machine of docs/performance.md, while a bf16 matrix product runs at
~900. `BlockedAttnProcessor` computes the same softmax(QK^T / sqrt(d)) V with one plain
matrix product per (image, head, block of queries): the block's scores (512 queries x all
keys, a few MB) stay in the cache between the three steps (scores, softmax, weighted sum),
so each runs near its kernel's speed. It is exact attention (no approximation); scores are
accumulated in fp32 inside the product, shifted so that the important ones round finely
when stored in bf16 (see `blocked_attention`), and the softmax runs in fp32 internally.

The processor is a normal diffusers attention processor (`attn, hidden_states,
encoder_hidden_states, attention_mask, temb`), so per-batch features can wrap it. It
computes blocked only where that measured faster (`blocked_applies`): CPU tensors in
bf16, no attention mask, at least `min_tokens` keys; everything else (fp32, cross-attention
over 77 text tokens, GPUs, masks) goes to SDPA as before, with identical results.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "blocked", "auto")


class BlockedAttnProcessor:
    """Self-attention in query blocks with one matrix product per head (CPU, bf16); SDPA otherwise.

    A block holds `block_scores` scores per head (2M measured best for 4096 tokens on the
    benchmark machine: 512 queries x 4096 keys, 4 MB in bf16); `min_tokens` is the smallest
    key count computed blocked; `dtypes` are the dtypes computed blocked.
    """

    def __init__(self, block_scores: int = 1 << 21, min_tokens: int = 256,
                 dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> None:
        if block_scores < 1 or min_tokens < 1:
            raise ValueError("block_scores and min_tokens must be positive")
        self.block_scores = block_scores
        self.min_tokens = min_tokens
        self.dtypes = dtypes

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        """diffusers' attention block: norms, projections, attention, output projection, residual."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.blocked_applies(query, key, attention_mask):
            out = blocked_attention(query, key, value, self.block_scores)  # (batch, tokens, heads, head_dim)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False).transpose(1, 2)
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def blocked_applies(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether this call is computed blocked (CPU, a blocked dtype, no mask, enough keys)."""
        return (mask is None and query.device.type == "cpu" and query.dtype in self.dtypes
                and key.shape[-2] >= self.min_tokens and not torch.is_grad_enabled())


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_scores: int = 1 << 21,
                      sample_stride: int = 16) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for (batch, heads, tokens, d) tensors, one head and query block at a time.

    Returns (batch, query tokens, heads, d), the layout the output projection reads. A block
    holds as many queries as fit `block_scores` scores (2M: 512 queries x 4096 keys, 4 MB in
    bf16, which stays in the cache); fewer, larger blocks also mean fewer operator calls.

    Rounding: a bf16 matrix product accumulates in fp32 but stores its result in bf16, whose
    8-bit mantissa gives a score of magnitude |s| an error of up to |s| / 256. The softmax only
    depends on score differences, so each query's scores are computed shifted by an estimate
    m of their maximum (the maximum over every `sample_stride`-th key): with a column m
    appended to Q and a column -1 appended to K, one product yields s - m, accumulated in
    fp32, and the scores that carry the most weight (those near the maximum) are then small
    and rounded finely. The 1/sqrt(d) factor is applied in the fp32 accumulation too
    (`addmm`'s alpha). Measured on random inputs with large scores: relative RMS error 0.4%
    vs 1.3% for plain bf16 scores (diffusers' classic `AttnProcessor`) and 0.2% for the
    flash kernel (fp32 scores); see docs/performance.md.
    """
    batch, heads, tokens, _ = query.shape
    keys = key.shape[-2]
    scale = query.shape[-1] ** -0.5
    block = max(1, min(tokens, block_scores // keys))
    shift = torch.matmul(query, key[:, :, ::sample_stride].transpose(-1, -2)).amax(dim=-1, keepdim=True)
    q_shifted = torch.cat([query, shift], dim=-1)
    k_shifted_t = torch.cat([key, key.new_full((*key.shape[:-1], 1), -1.0)], dim=-1).transpose(-1, -2)
    out = query.new_empty(batch, heads, tokens, value.shape[-1])

    def heads_of(pairs: list[tuple[int, int]]) -> None:
        # one score and one probability buffer per worker, reused by every block: a new 4 MB
        # tensor per block is a fresh mmap whenever glibc's mmap threshold is that low (it
        # was in gen_img runs, `library.heap`), and its page faults made the blocks
        # 2.9x slower
        scores_buffer = query.new_empty(block, keys)
        probs_buffer = query.new_empty(block, keys)
        for b, h in pairs:
            q, k_t, v = q_shifted[b, h], k_shifted_t[b, h], value[b, h]
            for start in range(0, tokens, block):
                rows = q[start : start + block]
                n = rows.shape[0]
                scores, probs = scores_buffer[:n], probs_buffer[:n]
                torch.addmm(_no_bias(n, keys, q.dtype), rows, k_t, beta=0, alpha=scale, out=scores)
                torch.softmax(scores, dim=-1, out=probs)
                torch.mm(probs, v, out=out[b, h, start : start + block])

    _on_worker_threads(heads_of, [(b, h) for b in range(batch) for h in range(heads)])
    return out.transpose(1, 2)


_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


def _on_worker_threads(work, items: list) -> None:
    """`work(part)` for `torch.get_num_threads()` interleaved parts of `items`, one per Python thread,
    each op single-threaded.

    The blocks are small (a few ms each); run as multi-threaded operators, each one would be
    an OpenMP parallel region ending in a barrier, and on a machine where another process
    takes a core every barrier waits for a descheduled thread (measured 3-6x slower than
    SDPA on the shared 2-core machine). Giving each Python thread whole heads instead, with
    torch's intra-op threads set to 1 meanwhile, has no barriers (torch releases the GIL
    inside each operator). The thread count is restored afterwards.

    Grad and inference mode are per thread in torch, so the workers run in the caller's:
    under `torch.inference_mode()` the output is an inference tensor, which a worker outside
    that mode may not write.
    """
    global _workers
    threads = torch.get_num_threads()
    if threads <= 1 or len(items) <= 1:
        work(items)
        return
    with _workers_lock:
        if _workers is None or _workers._max_workers != threads:
            _workers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="attention")
        pool = _workers
    torch.set_num_threads(1)
    try:
        parts = [items[i::threads] for i in range(threads)]
        in_callers_mode = functools.partial(_in_mode, work, torch.is_inference_mode_enabled(),
                                            torch.is_grad_enabled())
        for future in [pool.submit(in_callers_mode, part) for part in parts]:
            future.result()
    finally:
        torch.set_num_threads(threads)


def _in_mode(work, inference: bool, grad: bool, part: list) -> None:
    """`work(part)` with torch's inference and grad modes set as given (they are per thread)."""
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        work(part)


def _no_bias(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """A stand-in `input` for `addmm(..., beta=0)` (ignored, but it must broadcast)."""
    return torch.zeros((), dtype=dtype).expand(rows, columns)


def set_attention(unet: torch.nn.Module, mode: str = "auto") -> str:
    """Give every attention layer of `unet` its processor for the run; returns what was set.

    `sdpa`: diffusers' default (PyTorch SDPA). `blocked`: `BlockedAttnProcessor` (blocked for
    CPU bf16 self-attention, SDPA elsewhere). `auto`: `blocked` when the U-Net is on the CPU
    in bf16, where it measured faster, else leave the model as it is.
    """
    if mode not in ATTENTION_CHOICES:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    parameter = next(unet.parameters())
    if mode == "auto":
        mode = "blocked" if parameter.device.type == "cpu" and parameter.dtype == torch.bfloat16 else "sdpa"
        if mode == "sdpa":
            return "sdpa (unchanged)"
    if mode == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    else:
        unet.set_attn_processor(BlockedAttnProcessor())
    logger.debug("U-Net attention: %s", mode)
    return mode
