"""SDXL text encoding: CLIP-L and bigG states side by side (no final norm), bigG's pooled vector."""

from __future__ import annotations

import pytest
import torch

from library.models.loader import text_model
from library.models.tokenizer import build_tokenizer
from library.text.encoder import PromptEncoder, apply_weights
from library.text.sdxl_encoder import DualPromptEncoder

BOS, EOS = 49406, 49407
CAT, DOG = 2368, 1929  # "cat", "dog" (one token each)


def _encoders():
    """A tiny CLIP-L-like (quick_gelu) and a tiny bigG-like (gelu, projection) text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, num_hidden_layers=3, num_attention_heads=1, max_position_embeddings=77,
                  bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    first = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", **common))
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96, hidden_act="gelu",
                                                        projection_dim=40, pad_token_id=0, **common))
    for module in (first, second):
        module.eval().requires_grad_(False)
    return first, second


@pytest.fixture(scope="module")
def dual():
    first, second = _encoders()
    return DualPromptEncoder(
        PromptEncoder(build_tokenizer("sd1"), first, clip_skip=2, max_embeddings_multiples=3, final_layer_norm=False),
        PromptEncoder(build_tokenizer("sd2"), second, clip_skip=2, max_embeddings_multiples=3,
                      final_layer_norm=False, pooled=True),
    )


def _row(tokens: list[int], pad: int) -> list[int]:
    return [BOS, *tokens, EOS] + [pad] * (75 - len(tokens))


def test_states_are_both_penultimate_states_side_by_side_without_the_final_norm(dual):
    cond = dual.conditioning(["cat dog"], 1)
    ids_l = torch.tensor([_row([CAT, DOG], EOS)])  # tokenizer 1 pads with EOS
    ids_g = torch.tensor([_row([CAT, DOG], 0)])  # tokenizer 2 pads with "!" (id 0)
    assert dual.first.layout("cat dog", 1)[0] == ids_l.tolist()
    assert dual.second.layout("cat dog", 1)[0] == ids_g.tolist()
    first, second = dual.text_encoders
    expected = torch.cat([first(ids_l, output_hidden_states=True).hidden_states[-2],
                          second(ids_g, output_hidden_states=True).hidden_states[-2]], dim=-1)
    assert cond.states.shape == (1, 77, 32 + 48)
    assert torch.equal(cond.states, expected)
    normed = text_model(first).final_layer_norm(first(ids_l, output_hidden_states=True).hidden_states[-2])
    assert not torch.allclose(cond.states[..., :32], normed)  # SD1's rule (with the norm) is not used


def test_pooled_is_bigg_projected_first_eos_state_of_the_first_chunk(dual):
    long = "cat " * 80 + "dog " * 10  # two chunks: 75 cats, then 5 cats and 10 dogs
    assert dual.chunk_count(long) == 2
    cond = dual.conditioning([long, "dog"], 2)
    assert cond.states.shape == (2, 154, 80) and cond.pooled.shape == (2, 40)
    second = dual.text_encoders[1]
    empty = [BOS, EOS] + [0] * 75
    ids = torch.tensor([_row([CAT] * 75, 0), _row([CAT] * 5 + [DOG] * 10, 0), _row([DOG], 0), empty])
    out = second(ids)  # the rows the encoder runs, in one call (so the sums are the same)
    eos_states = out.last_hidden_state[[0, 2], [76, 2]]  # the first EOS of each prompt's first chunk
    assert torch.equal(cond.pooled, second.text_projection(eos_states))
    assert torch.allclose(cond.pooled, out.text_embeds[[0, 2]], rtol=0, atol=1e-6)  # its own pooling agrees
    assert not torch.allclose(cond.pooled[0], out.text_embeds[1])  # not the later chunk's


def test_weights_are_normalised_per_encoder_and_leave_the_pooled_vector(dual):
    plain = dual.conditioning(["cat dog"], 1)
    weighted = dual.conditioning(["(cat:1.5) dog"], 1)
    weights = torch.ones(1, 77, 1)
    weights[0, 1] = 1.5
    left = apply_weights(plain.states[..., :32], weights, "original")
    right = apply_weights(plain.states[..., 32:], weights, "original")
    assert torch.allclose(weighted.states, torch.cat([left, right], dim=-1), atol=1e-6)
    assert torch.equal(weighted.pooled, plain.pooled)


def test_break_and_the_225_token_limit_hold_for_both_encoders(dual):
    cond = dual.conditioning(["cat BREAK dog"], 2)
    assert dual.chunk_count("cat BREAK dog") == 2
    assert dual.second.layout("cat BREAK dog", 2)[0] == [_row([CAT], 0), _row([DOG], 0)]
    assert cond.states.shape == (1, 154, 80)
    assert dual.chunk_count("cat " * 400) == 3  # --max_embeddings_multiples 3: 225 tokens
