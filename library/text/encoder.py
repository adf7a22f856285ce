"""Weighted, long prompts -> text-encoder hidden states.

Written by hand (no library does this). A prompt is parsed with the web UI's attention syntax
(`library.text.weighting`), tokenized fragment by fragment, and split into chunks of 75 tokens.
Token layout of one prompt with `chunks` chunks (what `encode` feeds the text encoder):

* chunk i holds tokens ``75*i ... 75*i+74`` of the prompt as ``[BOS] tokens [EOS] [PAD]...``,
  77 ids; ``BREAK`` ends the current chunk early (a trailing ``BREAK`` adds nothing);
* a prompt with fewer chunks than the batch needs (e.g. the negative prompt beside a long
  prompt) gets ``[BOS] [EOS] [PAD]*75`` chunks, the encoding of an empty prompt;
* the chunks are encoded separately and concatenated: hidden states are (B, 77*chunks, C), so
  `--max_embeddings_multiples 3` gives 225 usable tokens. Tokens past the limit are dropped
  with a warning naming the option.

BOS/EOS/PAD are the tokenizer's (SD1 pads with EOS, SD2 with ``!``). An embedding word
(`library.text.embeddings`) is kept whole in one chunk when it fits, as in the web UI.

Weights: every token's hidden state is multiplied by its weight (BOS/EOS/PAD by 1). Then, per
prompt, over all its chunks, tokens and channels (`--emb_normalize_mode`):

* ``original``: ``out = h*w * mean(h) / mean(h*w)`` (the mean is restored, as the
  long-prompt-weighting pipeline that the original tool uses does);
* ``abs``: ``out = h*w * mean(|h|) / mean(|h*w|)``;
* ``none``: ``out = h*w``.

A prompt whose weights are all 1 is returned unchanged (the formulas give the same values).

`--clip_skip N`: hidden state N from the end (1 = the last layer), then the text encoder's
final layer norm, as in the original tool. SDXL's encoders (`final_layer_norm=False`) take the
hidden state without that norm, as SDXL was trained (`library.text.sdxl_encoder`).

`pooled=True` (SDXL's bigG encoder) adds `Conditioning.pooled`: per prompt, the text
projection of the final-norm output at the first EOS of its FIRST chunk (the text
encoder's own pooling, taken by position so that an added embedding token with a larger id
than EOS cannot be mistaken for it). It is unweighted: the weights change the states only.

`encode` returns a `Conditioning`: the default states (B, 77*chunks, C) and, when a prompt of
the batch uses an XTI embedding, one encoding per U-Net cross-attention layer (by LDM layer
name), which `library.features.xti` hands to each layer. The default states are then the first layer's
(what the ControlNet, which has no such layers, attends to).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from library.errors import UserError
from library.models.loader import text_model
from library.text.weighting import BREAK_TEXT, BREAK_WEIGHT, parse_prompt_attention

logger = logging.getLogger(__name__)

CHUNK = 75  # usable tokens per 77-token window
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class WeightedTokens:
    """A prompt as token ids with one weight per token, split into chunks of at most 75."""

    chunks: tuple[tuple[tuple[int, float], ...], ...]

    @property
    def token_count(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class Conditioning:
    """Text states for the U-Net rows of a batch: default states, and per-layer states for XTI."""

    states: torch.Tensor  # (rows, T, C)
    per_layer: Mapping[str, torch.Tensor] | None = None  # LDM layer name -> (rows, T, C)
    # prompts split at ` AND `: each part's encoding of the prompt rows (`library.features.attention_couple`);
    # `states` then holds part 0 in those rows
    parts: tuple[Conditioning, ...] = ()
    # SDXL: the pooled text vector of each row (rows, P) and the size numbers of each row (rows, 6),
    # the U-Net's `added_cond_kwargs` (`library.sampling.added_conditioning`); None on SD 1.x/2.x
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        layers = None if self.per_layer is None else {k: v.to(device, dtype) for k, v in self.per_layer.items()}
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        time_ids = None if self.time_ids is None else self.time_ids.to(device, dtype)
        return Conditioning(self.states.to(device, dtype), layers, tuple(p.to(device, dtype) for p in self.parts),
                            pooled, time_ids)

    def rows(self, index: Sequence[int]) -> Conditioning:
        """The conditioning of some rows (default, per-layer and added), without parts."""
        index = list(index)
        layers = None if self.per_layer is None else {k: v[index] for k, v in self.per_layer.items()}
        return Conditioning(self.states[index], layers, (), _pick(self.pooled, index), _pick(self.time_ids, index))

    def added_cond_kwargs(self) -> dict | None:
        """The U-Net's `added_cond_kwargs` (SDXL's `text_time` embedding), or None without them."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def layer_states(self, layer: str) -> torch.Tensor:
        """The states cross-attention layer `layer` attends to (XTI: its own)."""
        return self.states if self.per_layer is None else self.per_layer[layer]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of `parts` one after the other; a part without per-layer states uses its default."""
        states = torch.cat([p.states for p in parts])
        pooled = _cat([p.pooled for p in parts])
        time_ids = _cat([p.time_ids for p in parts])
        names = next((list(p.per_layer) for p in parts if p.per_layer is not None), None)
        if names is None:
            return Conditioning(states, pooled=pooled, time_ids=time_ids)
        layers = {n: torch.cat([p.states if p.per_layer is None else p.per_layer[n] for p in parts]) for n in names}
        return Conditioning(states, layers, pooled=pooled, time_ids=time_ids)


def _cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The rows of all `tensors`, or None when none is given (a mix is a programming error)."""
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError("conditionings with and without added (SDXL) vectors cannot be joined")
    return torch.cat(list(tensors))


def _pick(tensor: torch.Tensor | None, index: list[int]) -> torch.Tensor | None:
    return None if tensor is None else tensor[index]


class PromptEncoder:
    """Encodes batches of prompts for one text encoder and tokenizer (and optional embeddings)."""

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        *,
        clip_skip: int = 1,
        max_embeddings_multiples: int = 1,
        normalize_mode: str = "original",
        embeddings=None,
        final_layer_norm: bool = True,
        pooled: bool = False,
    ) -> None:
        """`embeddings` is a `library.text.embeddings.EmbeddingSet` or None; `final_layer_norm`
        False takes clip-skip states without the final norm (SDXL); `pooled` adds the projected
        EOS state of each prompt's first chunk (SDXL's bigG encoder; module docstring)."""
        if normalize_mode not in ("original", "abs", "none"):
            raise ValueError(f"unknown emb_normalize_mode {normalize_mode!r}")
        layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
        if layers is not None and clip_skip > layers:
            raise UserError(f"--clip_skip {clip_skip}: the text encoder has only {layers} layers; use 1 to {layers}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = max(1, clip_skip)
        self.max_chunks = max(1, max_embeddings_multiples)
        self.normalize_mode = normalize_mode
        self.embeddings = embeddings
        self.final_layer_norm = final_layer_norm
        self.pooled = pooled
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
        breaks = False
        for text, weight in parse_prompt_attention(prompt):
            if text == BREAK_TEXT and weight == BREAK_WEIGHT:
                chunks.append([])
                breaks = True
                continue
            for ids, whole in self._token_groups(str(text)):
                if whole and len(chunks[-1]) + len(ids) > CHUNK and chunks[-1] and len(ids) <= CHUNK:
                    chunks.append([])  # keep an embedding's vectors in one chunk
                for token in ids:
                    if len(chunks[-1]) == CHUNK:
                        chunks.append([])
                    chunks[-1].append((token, float(weight)))
        if len(chunks) > 1 and not chunks[-1]:
            chunks.pop()
        if len(chunks) > self.max_chunks:
            self._warn_truncated(prompt, chunks, breaks)
            chunks = chunks[: self.max_chunks]
        result = WeightedTokens(tuple(tuple(c) for c in chunks))
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[prompt] = result
        return result

    def _warn_truncated(self, prompt: str, chunks: list[list], breaks: bool) -> None:
        """The warning for tokens past the chunk limit; with BREAK it says that BREAK starts a
        new chunk (a short prompt with BREAK needs more than one) and how many to allow."""
        dropped = sum(len(c) for c in chunks[self.max_chunks:])
        if breaks:
            logger.warning(
                "prompt truncated: BREAK starts a new %d-token chunk and --max_embeddings_multiples allows %d "
                "(the default is 1); %d tokens in the chunks after the limit were dropped; give "
                "--max_embeddings_multiples %d to keep them: %.60s",
                CHUNK, self.max_chunks, dropped, len(chunks), prompt,
            )
            return
        logger.warning(
            "prompt truncated: %d tokens past the %d-token limit were dropped "
            "(raise --max_embeddings_multiples): %.60s...",
            dropped, CHUNK * self.max_chunks, prompt,
        )

    def _token_groups(self, text: str) -> list[tuple[list[int], bool]]:
        """Token ids of `text`: (ids, False) for plain text, (ids, True) for each embedding word."""
        parts = self.embeddings.split(text) if self.embeddings is not None else [text]
        groups = []
        for part in parts:
            if isinstance(part, tuple):
                groups.append((list(part), True))
            elif part:
                groups.append((self.tokenizer(part, add_special_tokens=False, verbose=False).input_ids, False))
        return groups

    def chunk_count(self, *prompts: str) -> int:
        """Chunks needed by the longest of `prompts` (images sharing a batch must agree)."""
        return max(len(self.tokenize(p).chunks) for p in prompts)

    def layout(self, prompt: str, chunks: int) -> tuple[list[list[int]], list[float]]:
        """The `chunks` rows of 77 ids fed to the text encoder, and the 77*chunks weights."""
        tokens = self.tokenize(prompt).chunks
        rows, weights = [], []
        for i in range(chunks):
            chunk = tokens[i] if i < len(tokens) else ()
            pad = CHUNK - len(chunk)
            rows.append([self.bos] + [t for t, _ in chunk] + [self.eos] + [self.pad] * pad)
            weights.extend([1.0] + [w for _, w in chunk] + [1.0] * (pad + 1))
        return rows, weights

    # --- encoding ---------------------------------------------------------------------

    def encode(self, prompts: list[str], chunks: int) -> torch.Tensor:
        """Text states (B, 77 * chunks, C) of `prompts`, each padded to `chunks` chunks."""
        return self.conditioning(prompts, chunks).states

    @torch.no_grad()
    def conditioning(self, prompts: list[str], chunks: int) -> Conditioning:
        """`encode`'s states and, with XTI words in any prompt, one encoding per U-Net
        cross-attention layer."""
        ids, weights = [], []
        for prompt in prompts:
            rows, row_weights = self.layout(prompt, chunks)
            ids.extend(rows)
            weights.append(row_weights)
        device = next(self.text_encoder.parameters()).device
        id_tensor = torch.tensor(ids, device=device)
        weight_tensor = torch.tensor(weights, device=device, dtype=torch.float32).unsqueeze(-1)
        layers = self.embeddings.layer_names if self.embeddings is not None and self.embeddings.has_xti else ()
        first_rows = id_tensor[::chunks]  # each prompt's first chunk (the pooled vector's)
        if not layers or not any(self.embeddings.is_xti_id(t) for row in ids for t in row):
            layer = layers[0] if layers else None
            hidden, pooled = self._hidden_states(id_tensor, layer, first_rows)
            return Conditioning(self._weighted(hidden, weight_tensor, len(prompts)), pooled=pooled)
        per_layer, pooled = {}, None
        for layer in layers:
            hidden, layer_pooled = self._hidden_states(id_tensor, layer, first_rows)
            per_layer[layer] = self._weighted(hidden, weight_tensor, len(prompts))
            pooled = layer_pooled if pooled is None else pooled
        return Conditioning(per_layer[layers[0]], per_layer, pooled=pooled)

    def _hidden_states(self, ids: torch.Tensor, layer: str | None,
                       first_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder output (rows, 77, C) for `ids`, with `--clip_skip` and the embeddings,
        and the pooled vectors of `first_rows` (None unless `pooled`)."""
        if self.embeddings is None:
            return self._run_text_encoder(ids, first_rows)
        with self.embeddings.installed(self.text_encoder, layer):
            return self._run_text_encoder(ids, first_rows)

    def _run_text_encoder(self, ids: torch.Tensor,
                          first_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.clip_skip == 1 and self.final_layer_norm and not self.pooled:
            return self.text_encoder(ids).last_hidden_state, None
        out = self.text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-self.clip_skip]
        if self.final_layer_norm:
            hidden = text_model(self.text_encoder).final_layer_norm(hidden)
        return hidden, self._pooled(out.last_hidden_state[:: ids.shape[0] // first_rows.shape[0]], first_rows)

    def _pooled(self, last: torch.Tensor, first_rows: torch.Tensor) -> torch.Tensor | None:
        """The text projection of `last` (final-norm states of each prompt's first chunk) at
        the first EOS of each row; None unless `pooled`."""
        if not self.pooled:
            return None
        eos = (first_rows == self.eos).int().argmax(dim=1)
        picked = last[torch.arange(last.shape[0], device=last.device), eos]
        projection = getattr(self.text_encoder, "text_projection", None)
        return picked if projection is None else projection(picked)

    def _weighted(self, hidden: torch.Tensor, weights: torch.Tensor, batch: int) -> torch.Tensor:
        """Rows of one prompt joined to (B, 77*chunks, C), then weighted (module docstring)."""
        hidden = hidden.reshape(batch, -1, hidden.shape[-1])
        return apply_weights(hidden, weights.to(hidden.device), self.normalize_mode)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Multiply (B, T, C) `hidden` by (B, T, 1) `weights` and renormalize per prompt by `mode`.

    Statistics are taken in float32; prompts whose weights are all 1 come back unchanged.
    """
    if bool((weights == 1).all()):
        return hidden
    weighted = hidden.float() * weights
    if mode == "none":
        return weighted.to(hidden.dtype)
    stat = (lambda x: x.abs().mean(dim=(1, 2), keepdim=True)) if mode == "abs" else (
        lambda x: x.mean(dim=(1, 2), keepdim=True)
    )
    before = stat(hidden.float())
    after = stat(weighted)
    unchanged = (weights == 1).all(dim=(1, 2), keepdim=True)
    scale = torch.where(unchanged, torch.ones_like(before), before / after)
    return (weighted * scale).to(hidden.dtype)
