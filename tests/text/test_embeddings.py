"""Textual Inversion and XTI embeddings: file formats, prompt words, errors, per-layer U-Net states."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.errors import UserError
from library.features.xti import PerLayerText
from library.models.loader import text_model
from library.models.unet_blocks import cross_attention_layer_names
from library.sampling.patches import Batch, BatchLayout, PatchOwner
from library.text.embeddings import (
    EmbeddingSet,
    load_embeddings,
    load_textual_inversion,
    write_embedding,
    write_xti,
)
from library.text.encoder import Conditioning, PromptEncoder

FAST = ["--steps", "3", "--W", "64", "--H", "64", "--seed", "1"]
TINY_LAYERS = ["IN01", "MID", "OUT02", "OUT03"]
KOHYA_LAYERS = [
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
]


def rows(model, words: str) -> torch.Tensor:
    """The token-embedding rows of `words` (so an embedding of them must equal the words)."""
    ids = model.tokenizer(words, add_special_tokens=False).input_ids
    return text_model(model.text_encoder).embeddings.token_embedding.weight[ids].clone()


def random_vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def image(tiny_models, outdir: Path, prompt: str, *extra: str) -> np.ndarray:
    argv = ["--ckpt", str(tiny_models["sd1"]), "--prompt", prompt, "--outdir", str(outdir), *FAST, *extra]
    assert gen_img.main(argv) == 0
    (png,) = sorted(outdir.glob("*.png"))
    return np.asarray(Image.open(png), dtype=np.int16)


# --- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "bin"])
def test_every_format_loads_to_the_same_vectors(tmp_path, fmt):
    vectors = random_vectors(3)
    path = write_embedding(tmp_path / f"goodembed.{fmt}", vectors)
    emb = load_textual_inversion(path, 32)
    assert emb.name == "goodembed" and emb.size == 3
    assert torch.equal(emb.vectors, vectors)


def test_webui_pt_layout_single_vector_and_fp16(tmp_path):
    one = random_vectors(1)[0].half()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": one}, "name": "x", "step": 10}, tmp_path / "w.pt")
    torch.save({"<tok>": one}, tmp_path / "learned_embeds.bin")  # Diffusers: one 1-D tensor
    for name in ("w.pt", "learned_embeds.bin"):
        emb = load_textual_inversion(tmp_path / name, 32)
        assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, one.float()[None])


def test_width_mismatch_names_the_file_and_both_widths(tmp_path, sd1):
    path = write_embedding(tmp_path / "sd2embed.safetensors", random_vectors(2, width=1024))
    with pytest.raises(UserError) as info:
        load_embeddings([str(path)], [], sd1.text_encoder)
    assert str(info.value) == (
        f"--textual_inversion_embeddings {path}: its vectors are 1024 wide but this model's text encoder takes 32; "
        "use an embedding trained for this model family (SD 1.x: 768, SD 2.x: 1024)"
    )


def test_width_mismatch_exits_2_with_one_line(tiny_models, tmp_path, capsys):
    path = write_embedding(tmp_path / "wide.pt", random_vectors(1, width=768))
    argv = ["--ckpt", str(tiny_models["sd1"]), "--prompt", "wide", "--outdir", str(tmp_path), *FAST,
            "--textual_inversion_embeddings", str(path)]
    assert gen_img.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gen_img.py: error: --textual_inversion_embeddings {path}: its vectors are 768 wide but this "
                   "model's text encoder takes 32; use an embedding trained for this model family "
                   "(SD 1.x: 768, SD 2.x: 1024)")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_are_user_errors(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": _Evil()}}, f, protocol=2)
    torch.save({"clip_l": random_vectors(1), "clip_g": random_vectors(1)}, tmp_path / "xl.pt")
    torch.save({"a": random_vectors(1), "b": random_vectors(1)}, tmp_path / "two.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "evil.pt": "refused: the pickle holds objects other than tensors",
        "xl.pt": "an SDXL embedding (clip_l/clip_g)",
        "two.bin": "no embedding found (keys: a, b); expected string_to_param (web UI .pt), emb_params or a single tensor",
        "junk.safetensors": "not a readable safetensors file",
        "missing.pt": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=r"^--textual_inversion_embeddings .*" + re.escape(message)):
            load_textual_inversion(tmp_path / name, 32)


def test_duplicate_names_are_a_user_error(tmp_path, sd1):
    a = write_embedding(tmp_path / "Same.pt", random_vectors(1))
    (tmp_path / "sub").mkdir()
    b = write_embedding(tmp_path / "sub" / "same.safetensors", random_vectors(1))
    with pytest.raises(UserError, match=r"both define the prompt word 'same'; rename one of the files$"):
        load_embeddings([str(a), str(b)], [], sd1.text_encoder)


# --- prompt words ---------------------------------------------------------------------------------


def test_embedding_of_word_rows_encodes_like_the_words(tmp_path, sd1):
    path = write_embedding(tmp_path / "myword.pt", rows(sd1, "red cat"))
    emb = load_embeddings([str(path)], [], sd1.text_encoder)
    with_ti = PromptEncoder(sd1.tokenizer, sd1.text_encoder, embeddings=emb)
    plain = PromptEncoder(sd1.tokenizer, sd1.text_encoder)
    prompts = ["a myword, (MyWord:1.2) sat", "[myword] BREAK myword"]
    expected = ["a red cat, (red cat:1.2) sat", "[red cat] BREAK red cat"]
    assert torch.equal(with_ti.encode(prompts, 2), plain.encode(expected, 2))
    assert with_ti.tokenize("a myword").chunks == (((320, 1.0), (49408, 1.0), (49409, 1.0)),)
    # whole words only; the model's own weights are untouched afterwards
    assert with_ti.tokenize("mywords myword_x") == plain.tokenize("mywords myword_x")
    assert text_model(sd1.text_encoder).embeddings.token_embedding.num_embeddings == 49408


def test_two_embeddings_get_separate_ids(tmp_path, sd1):
    a = write_embedding(tmp_path / "alpha.safetensors", random_vectors(2, seed=1))
    b = write_embedding(tmp_path / "alpha-beta.bin", random_vectors(1, seed=2))
    emb = load_embeddings([str(a), str(b)], [], sd1.text_encoder)
    assert emb.split("x alpha-beta, alpha") == ["x ", (49410,), ", ", (49408, 49409)]
    table = emb.table(None, torch.float32, torch.device("cpu"))
    assert torch.equal(table, torch.cat([random_vectors(2, seed=1), random_vectors(1, seed=2)]))


def test_multi_vector_embedding_is_not_split_across_chunks(tmp_path, sd1):
    path = write_embedding(tmp_path / "three.pt", random_vectors(3))
    enc = PromptEncoder(sd1.tokenizer, sd1.text_encoder, max_embeddings_multiples=2,
                        embeddings=load_embeddings([str(path)], [], sd1.text_encoder))
    chunks = enc.tokenize("cat " * 73 + "three").chunks
    assert [len(c) for c in chunks] == [73, 3] and [t for t, _ in chunks[1]] == [49408, 49409, 49410]


def test_ti_changes_the_image_only_when_named(tiny_models, tmp_path, sd1):
    path = tiny_models["embedding"]  # goodembed.safetensors, made by library/models/tiny_files.py
    ti = ("--textual_inversion_embeddings", str(path))
    plain = image(tiny_models, tmp_path / "plain", "a cat --n blur")
    unnamed = image(tiny_models, tmp_path / "unnamed", "a cat --n blur", *ti)
    assert np.array_equal(plain, unnamed)
    as_text = image(tiny_models, tmp_path / "text", "a (goodembed:1.2) cat --n blur")
    named = image(tiny_models, tmp_path / "named", "a (goodembed:1.2) cat --n blur", *ti)
    assert np.abs(named - as_text).max() > 0 and np.abs(named - plain).max() > 0
    negative_text = image(tiny_models, tmp_path / "negtext", "a cat --n goodembed")
    negative = image(tiny_models, tmp_path / "neg", "a cat --n goodembed", *ti)
    assert np.abs(negative - negative_text).max() > 0


def test_ti_of_word_rows_gives_the_image_of_the_words(tiny_models, tmp_path, sd1):
    path = write_embedding(tmp_path / "redcat.pt", rows(sd1, "red cat"))
    words = image(tiny_models, tmp_path / "words", "a red cat --n blur")
    ti = image(tiny_models, tmp_path / "ti", "a redcat --n blur", "--textual_inversion_embeddings", str(path))
    assert np.array_equal(words, ti)


# --- XTI ------------------------------------------------------------------------------------------


def test_layer_names_follow_the_ldm_blocks(sd1):
    from diffusers import UNet2DConditionModel

    assert cross_attention_layer_names(sd1.unet) == TINY_LAYERS
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768)  # the SD 1.x layout
    assert cross_attention_layer_names(sd15) == KOHYA_LAYERS


def test_xti_file_must_match_the_unet_layers(tmp_path, sd1):
    path = write_xti(tmp_path / "kohya.safetensors", {k: random_vectors(1) for k in KOHYA_LAYERS})
    with pytest.raises(UserError, match=r"^--XTI_embeddings .*kohya.safetensors: holds layers IN01, IN02, .* but "
                       r"this U-Net's cross-attention layers are IN01, MID, OUT02, OUT03 \(it was made for a U-Net "
                       r"of another layout\)$"):
        load_embeddings([], [str(path)], sd1.text_encoder, sd1.unet)
    ti_file = write_embedding(tmp_path / "plain.safetensors", random_vectors(1))
    with pytest.raises(UserError, match="looks like a plain embedding, use --textual_inversion_embeddings$"):
        load_embeddings([], [str(ti_file)], sd1.text_encoder, sd1.unet)
    uneven = write_xti(tmp_path / "uneven.safetensors", {k: random_vectors(1 + (k == "MID")) for k in TINY_LAYERS})
    with pytest.raises(UserError, match=r"layers hold different numbers of vectors \(\[1, 2\]\)"):
        load_embeddings([], [str(uneven)], sd1.text_encoder, sd1.unet)


def test_xti_encodes_once_per_layer(tmp_path, sd1):
    layers = {k: random_vectors(2, seed=i) for i, k in enumerate(TINY_LAYERS)}
    path = write_xti(tmp_path / "xword.safetensors", layers)
    ti = write_embedding(tmp_path / "tword.pt", random_vectors(1, seed=9))
    emb = load_embeddings([str(ti)], [str(path)], sd1.text_encoder, sd1.unet)
    assert emb.has_xti and emb.layer_names == tuple(TINY_LAYERS)
    enc = PromptEncoder(sd1.tokenizer, sd1.text_encoder, embeddings=emb)
    cond = enc.conditioning(["a (xword:1.3) tword", "dog"], 1)
    assert list(cond.per_layer) == list(TINY_LAYERS)
    assert all(states.shape == (2, 77, 32) for states in cond.per_layer.values())
    assert torch.equal(cond.states, cond.per_layer[TINY_LAYERS[0]])
    for name in TINY_LAYERS:
        single = EmbeddingSet(49408, [load_textual_inversion(ti, 32), _as_ti(path, layers[name], "xword")])
        expected = PromptEncoder(sd1.tokenizer, sd1.text_encoder, embeddings=single).encode(
            ["a (xword:1.3) tword", "dog"], 1
        )
        assert torch.equal(cond.per_layer[name], expected)


def _as_ti(path: Path, vectors: torch.Tensor, name: str):
    from library.text.embeddings import Embedding

    return Embedding(name, path, vectors=vectors)


def test_unet_patch_gives_each_layer_its_states_and_restores_processors(sd1):
    unet = sd1.unet
    names = cross_attention_layer_names(unet)
    states = [torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(i)) for i in range(len(names))]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(module.to_k.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, a[0])))
    before = dict(unet.attn_processors)
    owner = PatchOwner(unet, [PerLayerText(unet, names)])
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor(10)
    batch = Batch((), BatchLayout(1, 1, 8, 8), None, t.reshape(1), torch.device("cpu"), torch.float32)
    per_layer = Conditioning(states[0], dict(zip(names, states)))
    try:
        with owner.installed(batch) as run:
            run.unet_call(run.context(0, t), sample, t, per_layer)
            expected = {"down_blocks.0": 0, "mid_block": 1, "up_blocks.1.attentions.0": 2, "up_blocks.1.attentions.1": 3}
            for module_name, tensor in seen.items():
                (index,) = [i for prefix, i in expected.items() if module_name.startswith(prefix)]
                assert torch.equal(tensor, states[index]), module_name
            plain = run.unet_call(run.context(0, t), sample, t, Conditioning(states[0]))
            assert all(torch.equal(v, states[0]) for v in seen.values())  # no per-layer states: pass through
        assert dict(unet.attn_processors) == before
        with pytest.raises(RuntimeError):
            with owner.installed(batch) as run:
                run.unet_call(run.context(0, t), torch.randn(1, 3, 8, 8), t, per_layer)
        assert dict(unet.attn_processors) == before  # restored after an error
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(unet(sample, t, encoder_hidden_states=states[0]).sample, plain)


def test_xti_images(tiny_models, tmp_path, sd1):
    cat = rows(sd1, "cat")
    same = write_xti(tmp_path / "xcat.safetensors", {k: cat for k in TINY_LAYERS})
    words = image(tiny_models, tmp_path / "words", "a cat --n blur")
    xti_same = image(tiny_models, tmp_path / "same", "a xcat --n blur", "--XTI_embeddings", str(same))
    assert np.array_equal(words, xti_same)
    mixed = write_xti(tmp_path / "xmix.safetensors", {k: (rows(sd1, "dog") if k == "MID" else cat) for k in TINY_LAYERS})
    xti_mixed = image(tiny_models, tmp_path / "mixed", "a xmix --n blur", "--XTI_embeddings", str(mixed))
    assert np.abs(xti_mixed - words).max() > 0
    unnamed = image(tiny_models, tmp_path / "unnamed", "a cat --n blur", "--XTI_embeddings", str(mixed))
    assert np.array_equal(unnamed, words)
    negative = image(tiny_models, tmp_path / "neg", "a cat --n xmix", "--XTI_embeddings", str(mixed))
    negative_same = image(tiny_models, tmp_path / "negsame", "a cat --n xcat", "--XTI_embeddings", str(same))
    assert np.abs(negative - negative_same).max() > 0
