"""SDXL's two text encoders as one prompt encoder: states side by side, bigG's pooled vector.

SDXL conditions its U-Net on two CLIP text encoders, CLIP ViT-L/14 (768 wide) and OpenCLIP
ViT-bigG/14 (1280 wide, with a text projection). Each encoder gets the prompt through its own
`library.text.encoder.PromptEncoder` (its own tokenizer: tokenizer 1 pads with EOS, tokenizer
2 with id 0, ``!``), so the 75-token chunks, BREAK, the 225-token limit, the weighting and the
emphasis normalisation are those of SD 1.x/2.x, applied to each encoder's states on their
own (as the original tool does). Then:

* states: CLIP-L's and bigG's states of the same tokens concatenated on the last axis
  (77*chunks, 768 + 1280 = 2048); both taken `--clip_skip` layers from the end (default 2:
  the penultimate layer) WITHOUT the final layer norm, as SDXL was trained;
* pooled: bigG's final-norm output at the first EOS of the prompt's first chunk, through its
  text projection (1280), unweighted; prompts longer than 75 tokens take it from chunk 1.

XTI (per-layer embeddings) is an SD 1.x feature; per-layer states are therefore not joined
here, and an XTI file is refused when the embeddings load.
"""

from __future__ import annotations

import torch

from library.text.encoder import Conditioning, PromptEncoder


class DualPromptEncoder:
    """`PromptEncoder`'s interface over SDXL's CLIP-L (`first`) and bigG (`second`, pooled)."""

    def __init__(self, first: PromptEncoder, second: PromptEncoder) -> None:
        if first.final_layer_norm or second.final_layer_norm or not second.pooled:
            raise ValueError("SDXL's encoders take clip-skip states without the final norm; the second pools")
        self.first, self.second = first, second

    @property
    def embeddings(self):
        """The embeddings of the first encoder (the features look for XTI words there)."""
        return self.first.embeddings

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.first.text_encoder

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.first.text_encoder, self.second.text_encoder

    def chunk_count(self, *prompts: str) -> int:
        """Chunks needed by the longest of `prompts` in either tokenizer."""
        return max(self.first.chunk_count(*prompts), self.second.chunk_count(*prompts))

    def encode(self, prompts: list[str], chunks: int) -> torch.Tensor:
        """The 2048-wide states (B, 77 * chunks, 768 + 1280) of `prompts`."""
        return self.conditioning(prompts, chunks).states

    @torch.no_grad()
    def conditioning(self, prompts: list[str], chunks: int) -> Conditioning:
        """Both encoders' states side by side, and bigG's pooled vector of each prompt."""
        left = self.first.conditioning(prompts, chunks)
        right = self.second.conditioning(prompts, chunks)
        states = torch.cat([left.states, right.states.to(left.states.dtype)], dim=-1)
        return Conditioning(states, pooled=right.pooled)
