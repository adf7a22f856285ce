"""Weighted, long prompts -> text-encoder hidden states.

Written by hand (no library does this): a prompt is parsed with the web UI's attention
syntax (`library.prompt_weighting`), tokenized fragment by fragment, and split into chunks
of 75 tokens (`BREAK` starts a new chunk). Each chunk is encoded on its own with start/end
tokens and padding to 77, and the chunks are concatenated, so `--max_embeddings_multiples 3`
gives 225 usable tokens. Each token's hidden state is multiplied by its weight; with the
default `--emb_normalize_mode original` the mean of the result is then restored to the
unweighted mean (as the long-prompt-weighting pipelines do), `abs` restores the mean of the
absolute values, `none` leaves the weighted states.

`--clip_skip N` takes hidden state N from the end and applies the final layer norm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from library.models.loader import text_model
from library.prompt_weighting import parse_prompt_attention

logger = logging.getLogger(__name__)

CHUNK = 75  # usable tokens per 77-token window


@dataclass(frozen=True)
class WeightedTokens:
    """A prompt as token ids with one weight per token, split into chunks of at most 75."""

    chunks: tuple[tuple[tuple[int, float], ...], ...]


class PromptEncoder:
    """Encodes batches of prompts for one text encoder and tokenizer."""

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        *,
        clip_skip: int = 1,
        max_embeddings_multiples: int = 1,
        normalize_mode: str = "original",
    ) -> None:
        if normalize_mode not in ("original", "abs", "none"):
            raise ValueError(f"unknown emb_normalize_mode {normalize_mode!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = max(1, clip_skip)
        self.max_chunks = max(1, max_embeddings_multiples)
        self.normalize_mode = normalize_mode
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._cache: dict[str, WeightedTokens] = {}

    # --- tokenizing -------------------------------------------------------------------

    def tokenize(self, prompt: str) -> WeightedTokens:
        """Parse weights and split into chunks; tokens past the chunk limit are dropped (logged)."""
        cached = self._cache.get(prompt)
        if cached is not None:
            return cached
        chunks: list[list[tuple[int, float]]] = [[]]
        for text, weight in parse_prompt_attention(prompt):
            if weight == -1 and text == "BREAK":
                chunks.append([])
                continue
            for token in self.tokenizer(text, add_special_tokens=False).input_ids:
                if len(chunks[-1]) == CHUNK:
                    chunks.append([])
                chunks[-1].append((token, float(weight)))
        if len(chunks) > 1 and not chunks[-1]:
            chunks.pop()
        if len(chunks) > self.max_chunks:
            dropped = sum(len(c) for c in chunks[self.max_chunks:])
            logger.warning(
                "prompt truncated: %d tokens past the %d-token limit were dropped "
                "(raise --max_embeddings_multiples): %.60s...",
                dropped, CHUNK * self.max_chunks, prompt,
            )
            chunks = chunks[: self.max_chunks]
        result = WeightedTokens(tuple(tuple(c) for c in chunks))
        self._cache[prompt] = result
        return result

    def chunk_count(self, *prompts: str) -> int:
        """Chunks needed by the longest of `prompts` (images sharing a batch must agree)."""
        return max(len(self.tokenize(p).chunks) for p in prompts)

    # --- encoding ---------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str], chunks: int) -> torch.Tensor:
        """Hidden states (B, 77 * chunks, C) for `prompts`, each padded to `chunks` chunks."""
        ids, weights = [], []
        for prompt in prompts:
            tokens = self.tokenize(prompt).chunks
            for i in range(chunks):
                chunk = tokens[i] if i < len(tokens) else ()
                pad = CHUNK - len(chunk)
                ids.append([self.bos] + [t for t, _ in chunk] + [self.eos] + [self.pad] * pad)
                weights.append([1.0] + [w for _, w in chunk] + [1.0] * (pad + 1))
        device = next(self.text_encoder.parameters()).device
        id_tensor = torch.tensor(ids, device=device)
        hidden = self._hidden_states(id_tensor)
        weight_tensor = torch.tensor(weights, device=device, dtype=hidden.dtype).unsqueeze(-1)
        hidden = hidden.reshape(len(prompts), chunks * (CHUNK + 2), -1)
        weight_tensor = weight_tensor.reshape(len(prompts), chunks * (CHUNK + 2), 1)
        return self._apply_weights(hidden, weight_tensor)

    def _hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        if self.clip_skip == 1:
            return self.text_encoder(ids).last_hidden_state
        out = self.text_encoder(ids, output_hidden_states=True)
        return text_model(self.text_encoder).final_layer_norm(out.hidden_states[-self.clip_skip])

    def _apply_weights(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if bool((weights == 1).all()):
            return hidden
        if self.normalize_mode == "none":
            return hidden * weights
        stat = (lambda x: x.abs().mean(dim=(1, 2), keepdim=True)) if self.normalize_mode == "abs" else (
            lambda x: x.mean(dim=(1, 2), keepdim=True)
        )
        before = stat(hidden.float())
        weighted = hidden * weights
        after = stat(weighted.float())
        return (weighted.float() * (before / after)).to(hidden.dtype)


def chunks_needed(token_count: int) -> int:
    """Chunks for `token_count` tokens (at least one)."""
    return max(1, math.ceil(token_count / CHUNK))
