"""Weighted long-prompt encoding: chunk layout, truncation, weights, normalization, clip skip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.errors import UserError
from library.models import load_model
from library.models.loader import text_model
from library.text.encoder import CHUNK, PromptEncoder, apply_weights

FAST = ["--steps", "3", "--W", "64", "--H", "64", "--seed", "1"]
BOS, EOS = 49406, 49407
CAT, DOG, A, SAT = 2368, 1929, 320, 3279  # "cat", "dog", "a", "sat" (one token each)


@pytest.fixture(scope="module")
def sd2(tiny_models):
    return load_model(str(tiny_models["sd2"]))


def encoder(model, **kwargs) -> PromptEncoder:
    return PromptEncoder(model.tokenizer, model.text_encoder, **kwargs)


def image(tiny_models, outdir: Path, prompt: str, *extra: str) -> np.ndarray:
    assert gen_img.main(["--ckpt", str(tiny_models["sd1"]), "--prompt", prompt, "--outdir", str(outdir), *FAST, *extra]) == 0
    (png,) = sorted(outdir.glob("*.png"))
    return np.asarray(Image.open(png), dtype=np.int16)


LONG_A = "cat " * 200  # 200 tokens
LONG_B = "cat " * 75 + "dog " * 125  # same first chunk, different tokens past 75


# --- chunk layout ---------------------------------------------------------------------------------


def test_long_prompt_layout_and_negative_padded_to_the_same_chunks(sd1):
    enc = encoder(sd1, max_embeddings_multiples=3)
    assert [len(c) for c in enc.tokenize(LONG_A).chunks] == [75, 75, 50]
    assert enc.chunk_count(LONG_A, "") == 3
    rows, weights = enc.layout(LONG_A, 3)
    assert rows[0] == [BOS] + [CAT] * 75 + [EOS]
    assert rows[2] == [BOS] + [CAT] * 50 + [EOS] + [EOS] * 25  # SD1 pads with EOS
    assert weights == [1.0] * 231
    negative, _ = enc.layout("dog", 3)
    assert negative == [[BOS, DOG, EOS] + [EOS] * 74] + [[BOS, EOS] + [EOS] * 75] * 2
    states = enc.encode([LONG_A, "dog"], 3)
    assert states.shape == (2, 231, 32)
    empty = enc.encode([""], 1)[0]
    assert torch.equal(states[1, 77:154], empty) and torch.equal(states[1, 154:], empty)


def test_sd2_pads_with_exclamation_mark(sd2):
    rows, _ = encoder(sd2).layout("a cat", 2)
    assert rows == [[BOS, A, CAT, EOS] + [0] * 73, [BOS, EOS] + [0] * 75]


def test_break_starts_a_new_chunk(sd1):
    enc = encoder(sd1, max_embeddings_multiples=3)
    assert enc.tokenize("a cat BREAK a (dog:1.5)").chunks == (((A, 1.0), (CAT, 1.0)), ((A, 1.0), (DOG, 1.5)))
    rows, weights = enc.layout("a cat BREAK a (dog:1.5)", 2)
    assert rows == [[BOS, A, CAT, EOS] + [EOS] * 73, [BOS, A, DOG, EOS] + [EOS] * 73]
    assert weights[77:81] == [1.0, 1.0, 1.5, 1.0]
    assert enc.chunk_count("a cat BREAK") == 1  # a trailing BREAK adds nothing
    full = "cat " * 75 + "BREAK dog"
    assert [len(c) for c in enc.tokenize(full).chunks] == [75, 1]  # a full chunk is not followed by an empty one
    assert encoder(sd1, max_embeddings_multiples=1).chunk_count("a BREAK b BREAK c") == 1


# --- truncation -----------------------------------------------------------------------------------


def test_long_prompt_changes_embeddings_only_past_the_first_chunk(sd1):
    enc = encoder(sd1, max_embeddings_multiples=3)
    a, b = enc.encode([LONG_A, LONG_B], 3)
    assert torch.equal(a[:77], b[:77])
    assert torch.equal(a[[77, 154]], b[[77, 154]])  # each chunk's BOS sees only itself (causal)
    later = [i for i in range(77, 231) if i not in (77, 154)]
    assert (a[later] - b[later]).abs().amax(dim=-1).min() > 0  # every other later position differs


def test_truncation_with_one_chunk_is_logged(sd1, caplog):
    enc = encoder(sd1, max_embeddings_multiples=1)
    with caplog.at_level(logging.WARNING, logger="library.text.encoder"):
        tokens = enc.tokenize(LONG_B)
    assert tokens.token_count == 75 and enc.chunk_count(LONG_B) == 1
    assert "prompt truncated: 125 tokens past the 75-token limit were dropped (raise --max_embeddings_multiples)" in (
        caplog.text
    )
    assert torch.equal(enc.encode([LONG_A], 1), enc.encode([LONG_B], 1))


def test_tokens_past_75_change_the_image_only_without_truncation(tiny_models, tmp_path, caplog):
    long_a = image(tiny_models, tmp_path / "a3", LONG_A, "--max_embeddings_multiples", "3")
    long_b = image(tiny_models, tmp_path / "b3", LONG_B, "--max_embeddings_multiples", "3")
    assert np.abs(long_a - long_b).max() > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        short_a = image(tiny_models, tmp_path / "a1", LONG_A, "--max_embeddings_multiples", "1")
        short_b = image(tiny_models, tmp_path / "b1", LONG_B)
    assert np.array_equal(short_a, short_b)
    assert not np.array_equal(short_a, long_a)
    assert caplog.text.count("prompt truncated: 125 tokens past the 75-token limit") == 2


# --- weights --------------------------------------------------------------------------------------


def test_weight_one_is_the_plain_word(sd1):
    enc = encoder(sd1)
    assert enc.tokenize("a (cat:1.0) sat") == enc.tokenize("a cat sat")
    assert torch.equal(enc.encode(["a (cat:1.0) sat"], 1), enc.encode(["a cat sat"], 1))
    weighted = enc.encode(["(a:1.3) (cat:1.0) sat", "(a:1.3) cat sat"], 1)
    assert torch.equal(weighted[0], weighted[1])


def test_weight_zero_without_normalization_zeroes_those_tokens(sd1):
    enc = encoder(sd1, normalize_mode="none")
    plain = enc.encode(["a cat dog sat"], 1)[0]
    zeroed = enc.encode(["a (cat dog:0) sat"], 1)[0]
    assert enc.layout("a (cat dog:0) sat", 1)[0] == enc.layout("a cat dog sat", 1)[0]
    assert torch.equal(zeroed[2:4], torch.zeros(2, 32))
    keep = [0, 1] + list(range(4, 77))
    assert torch.equal(zeroed[keep], plain[keep])
    everything = enc.encode(["(a cat dog sat:0)"], 1)[0]
    assert torch.equal(everything[1:5], torch.zeros(4, 32)) and torch.equal(everything[0], plain[0])


@pytest.mark.parametrize("mode", ["original", "abs", "none"])
def test_normalize_modes_follow_their_formulas(sd1, mode):
    enc = encoder(sd1, normalize_mode=mode, max_embeddings_multiples=2)
    prompt = "a (cat:1.5) [dog] BREAK (sat:0.5)"
    rows, weights = enc.layout(prompt, 2)
    assert rows[0][:4] == [BOS, A, CAT, DOG] and rows[1][:3] == [BOS, SAT, EOS]
    h = text_model(sd1.text_encoder)(torch.tensor(rows)).last_hidden_state.reshape(1, 154, 32)
    w = torch.tensor(weights).reshape(1, 154, 1)
    assert w[0, 2, 0] == 1.5 and w[0, 3, 0] == pytest.approx(1 / 1.1) and w[0, 78, 0] == 0.5
    hw = h * w
    if mode == "original":
        expected = hw * (h.mean(dim=(1, 2), keepdim=True) / hw.mean(dim=(1, 2), keepdim=True))
        assert expected.mean().item() == pytest.approx(h.mean().item(), rel=1e-5)
    elif mode == "abs":
        expected = hw * (h.abs().mean(dim=(1, 2), keepdim=True) / hw.abs().mean(dim=(1, 2), keepdim=True))
        assert expected.abs().mean().item() == pytest.approx(h.abs().mean().item(), rel=1e-5)
    else:
        expected = hw
    assert torch.equal(enc.encode([prompt], 2), expected)


def test_normalization_is_per_prompt(sd1):
    enc = encoder(sd1)
    together = enc.encode(["a (cat:1.4)", "a dog"], 1)
    assert torch.equal(together[0], enc.encode(["a (cat:1.4)"], 1)[0])
    assert torch.equal(together[1], enc.encode(["a dog"], 1)[0])


def test_apply_weights_keeps_dtype_and_unweighted_rows():
    hidden = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)).half()
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0], [1.0] * 4]).unsqueeze(-1)
    out = apply_weights(hidden, weights, "original")
    assert out.dtype == torch.float16 and torch.equal(out[1], hidden[1])


# --- clip skip ------------------------------------------------------------------------------------


def manual_hidden_state(model, ids: torch.Tensor, layers_used: int) -> torch.Tensor:
    """Token + position embeddings, the first `layers_used` blocks with a causal mask, final norm."""
    tm = text_model(model.text_encoder)
    h = tm.embeddings(input_ids=ids)
    mask = torch.full((77, 77), float("-inf")).triu(1)[None, None]
    for layer in tm.encoder.layers[:layers_used]:
        h = layer(h, mask)
        h = h[0] if isinstance(h, tuple) else h
    return tm.final_layer_norm(h)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_is_hidden_state_n_from_the_end_through_the_final_norm(sd1, clip_skip):
    enc = encoder(sd1, clip_skip=clip_skip)
    rows, _ = enc.layout("a cat sat", 1)
    expected = manual_hidden_state(sd1, torch.tensor(rows), 3 - (clip_skip - 1))  # tiny encoder: 3 layers
    assert torch.equal(enc.encode(["a cat sat"], 1), expected)


def test_clip_skip_beyond_the_encoder_is_a_user_error(sd1):
    with pytest.raises(UserError, match=r"^--clip_skip 4: the text encoder has only 3 layers; use 1 to 3$"):
        encoder(sd1, clip_skip=4)


def test_clip_skip_changes_the_image(tiny_models, tmp_path):
    one = image(tiny_models, tmp_path / "one", "a cat")
    two = image(tiny_models, tmp_path / "two", "a cat", "--clip_skip", "2")
    assert np.abs(one - two).max() > 0


def test_chunk_constant():
    assert CHUNK == 75


def test_break_past_the_chunk_limit_says_what_break_does(sd1, caplog):
    enc = encoder(sd1, max_embeddings_multiples=1)
    with caplog.at_level(logging.WARNING, logger="library.text.encoder"):
        tokens = enc.tokenize("a cat BREAK a dog")
    assert tokens.token_count == 2 and enc.chunk_count("a cat BREAK a dog") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "prompt truncated: BREAK starts a new 75-token chunk and --max_embeddings_multiples allows 1 (the default "
        "is 1); 2 tokens in the chunks after the limit were dropped; give --max_embeddings_multiples 2 to keep "
        "them: a cat BREAK a dog"]
    assert encoder(sd1, max_embeddings_multiples=2).tokenize("a cat BREAK a dog").token_count == 4
