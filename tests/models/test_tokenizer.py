"""Tests for the offline CLIP tokenizer (`library.models.tokenizer`) and its vocabulary builder."""

from __future__ import annotations

import gzip
import json
import logging
import time
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from library.errors import UserError
from library.models import tokenizer as tok_mod
from library.models.tokenizer import CACHE_NAMES, VOCAB_DIR, SDCLIPTokenizer, load_tokenizer
from tools import build_clip_vocab

# Expected ids come from open-clip's own tokenizer (open_clip_torch 3.3.0, open_clip/tokenizer.py
# with its bundled bpe_simple_vocab_16e6.txt.gz): [sot_token_id] + SimpleTokenizer().encode(text)
# + [eot_token_id]. SD1 and SD2 must give exactly these ids (they differ only in padding).
OPEN_CLIP_IDS = [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("A Photo OF a CAT", [49406, 320, 1125, 539, 320, 2368, 49407]),
    (
        "masterpiece, best quality, 1girl, (smile:1.2), [blue eyes]",
        [49406, 12066, 267, 949, 3027, 267, 272, 1611, 267, 263, 3490, 281, 272, 269, 273, 2361, 314, 1746, 3095,
         316, 49407],
    ),
    ("wow!!! great!", [49406, 2781, 995, 830, 256, 49407]),
    (
        "3.14159 and 2048x1024 pixels",
        [49406, 274, 269, 272, 275, 272, 276, 280, 537, 273, 271, 275, 279, 343, 272, 271, 273, 275, 34099, 49407],
    ),
    (
        "café crème brûlée, naïve façade",
        [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 778, 10067, 1928, 49407],
    ),
    ("a cute 🐱 cat 🎉🎉", [49406, 320, 2242, 22979, 2368, 13450, 49407]),
    ("a    lot   of\tspaces\nand lines  ", [49406, 320, 1954, 539, 9006, 537, 3418, 49407]),
    (
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        [49406, 1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, 3120, 4262, 7726, 12658, 1585, 44351, 49407],
    ),
    ("rock &amp; roll", [49406, 2172, 261, 3341, 49407]),
    ("a &amp;amp; b", [49406, 320, 261, 321, 49407]),
    (
        "don't you're we'll it's I'd they've I'm",
        [49406, 847, 713, 592, 982, 649, 1342, 585, 568, 328, 1896, 889, 1200, 328, 880, 49407],
    ),
    ("東京タワー、夜景", [49406, 48338, 21078, 105, 34941, 2429, 107, 30391, 45262, 23170, 250, 48132, 363, 49407]),
    ("“curly quotes” and ﬁne ＡＢＣ", [49406, 257, 20795, 5808, 257, 537, 3797, 5334, 49407]),
    (
        "Привет мир",
        [49406, 26302, 16370, 29503, 110, 22176, 141, 480, 38018, 16701, 141, 478, 49407],
    ),
    ("", [49406, 49407]),
    ("hello_world-foo/bar:baz", [49406, 3306, 318, 1002, 268, 23435, 270, 2411, 281, 25268, 49407]),
    ("$100 @user #tag 50%", [49406, 259, 272, 271, 271, 287, 7031, 258, 3640, 276, 271, 260, 49407]),
    ("İstanbul ß Straße", [49406, 328, 16384, 11231, 127, 509, 1894, 127, 253, 324, 49407]),
]


@pytest.fixture(scope="module")
def shared() -> dict[str, SDCLIPTokenizer]:
    """One tokenizer per kind for the read-only tests (building one takes about 20 ms)."""
    return {kind: load_tokenizer(kind) for kind in ("sd1", "sd2", "sd2-v")}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2-v"])
@pytest.mark.parametrize(("text", "expected"), OPEN_CLIP_IDS, ids=[repr(t)[:30] for t, _ in OPEN_CLIP_IDS])
def test_ids_match_open_clip(shared: dict[str, SDCLIPTokenizer], kind: str, text: str, expected: list[int]) -> None:
    assert shared[kind](text).input_ids == expected


def test_basic_facts_sd1() -> None:
    tok = load_tokenizer("sd1")
    assert isinstance(tok, SDCLIPTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert (tok.vocab_size, len(tok), tok.model_max_length) == (49408, 49408, 77)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("kind", ["sd2", "sd2-v"])
def test_sd2_pads_with_zero(kind: str) -> None:
    tok = load_tokenizer(kind)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.pad_token) == (49406, 49407, 0, "!")
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70


def test_sd1_pads_with_end_token() -> None:
    ids = load_tokenizer("sd1")("a cat", padding="max_length", max_length=8).input_ids
    assert ids == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sdxl-2"])
def test_exclamation_marks_are_text_not_padding(kind: str) -> None:
    """SD2 and SDXL's bigG pad with "!", yet a prompt's "!!!" and "!" keep open-clip's BPE ids (995, 256)."""
    tok = load_tokenizer(kind)
    pad = 0 if kind in ("sd2", "sdxl-2") else 49407
    ids = tok("wow!!! great!", padding="max_length", max_length=10).input_ids
    assert ids == [49406, 2781, 995, 830, 256, 49407, pad, pad, pad, pad]
    assert tok.tokenize("wow!!! great!") == ["wow</w>", "!!!</w>", "great</w>", "!</w>"]
    assert "!" not in tok.get_added_vocab()


def test_truncation_keeps_end_token() -> None:
    # Checked against open_clip.tokenize(["a photo of a cat, " * 20]) (context length 77).
    ids = load_tokenizer("sd1")("a photo of a cat, " * 20, truncation=True, max_length=77).input_ids
    assert ids == ([49406] + [320, 1125, 539, 320, 2368, 267] * 20)[:76] + [49407]


def test_batch_and_tensors() -> None:
    out = load_tokenizer("sd2")(["A CAT", "rock &amp; roll"], padding="max_length", max_length=6,
                                truncation=True, return_tensors="pt")
    assert out.input_ids.tolist() == [[49406, 320, 2368, 49407, 0, 0], [49406, 2172, 261, 3341, 49407, 0]]


def test_html_entities_follow_ftfy() -> None:
    """Decision: clean like the original tool (ftfy only). ftfy leaves entities alone in text
    containing "<" or ">", where open-clip (html.unescape twice) would give
    [49406, 283, 321, 29, 5, 34308, 321, 285, 49407] ("&amp;" -> "&", id 5)."""
    tok = load_tokenizer("sd1")
    assert tok("<b>&amp;</b>").input_ids == [49406, 283, 321, 29, 261, 6259, 26, 34308, 321, 285, 49407]
    assert tok.tokenize("<b>&amp;</b>") == [
        "<</w>", "b</w>", ">", "&</w>", "amp</w>", ";", "</</w>", "b</w>", "></w>"]
    assert tok_mod.clean_text("  Rock &amp; ROLL ") == "rock & roll"


def test_typed_special_tokens_map_to_their_ids() -> None:
    """Decision: as in the original tool, typed <|startoftext|>/<|endoftext|> are the special ids."""
    assert load_tokenizer("sd1")("<|endoftext|> x <|startoftext|>").input_ids == [49406, 49407, 343, 49406, 49407]


def test_decode_round_trip() -> None:
    tok = load_tokenizer("sd2")
    assert tok.decode(tok("Wow!!! Great cat").input_ids, skip_special_tokens=True) == "wow !!! great cat"


def test_each_call_returns_a_new_tokenizer() -> None:
    first = load_tokenizer("sd1")
    assert first.add_tokens(["<my-embedding>"]) == 1
    assert len(first) == 49409
    assert len(load_tokenizer("sd1")) == 49408


def test_loading_is_fast() -> None:
    load_tokenizer("sd1")  # first call parses the shipped files
    start = time.perf_counter()
    for kind in ("sd1", "sd2"):
        load_tokenizer(kind)
    assert time.perf_counter() - start < 0.5


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown model kind 'sd3'"):
        load_tokenizer("sd3")


# --- Diffusers folders -----------------------------------------------------------------------


def test_diffusers_folder_is_used(tmp_path: Path) -> None:
    saved = load_tokenizer("sd1")
    saved.add_tokens(["<emb>"])
    saved.save_pretrained(tmp_path / "tokenizer")
    tok = load_tokenizer("sd2", diffusers_dir=tmp_path)
    assert tok.pad_token_id == 49407  # the folder's settings win over the kind's defaults
    assert tok("a <emb> cat").input_ids == [49406, 320, 49408, 2368, 49407]


def test_hub_layout_sd2_folder(tmp_path: Path) -> None:
    """A folder shaped like stabilityai/stable-diffusion-2's tokenizer/ (vocab + merges + json configs)."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((VOCAB_DIR / name).read_bytes())
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**specials, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                    "added_tokens_decoder": {"0": {"content": "!", "special": True, "lstrip": False,
                                                   "rstrip": False, "normalized": False, "single_word": False}}})
    )
    tok = load_tokenizer("sd2", diffusers_dir=tmp_path)
    assert tok.pad_token_id == 0
    assert tok("wow!!! great!", padding="max_length", max_length=8).input_ids == [
        49406, 2781, 995, 830, 256, 49407, 0, 0]


def test_stock_saved_sd2_folder(tmp_path: Path) -> None:
    """A folder saved by transformers' own CLIPTokenizer with pad "!": its tokenizer.json lists "!"
    as a never-split added token, which loading leaves out again."""
    stock = CLIPTokenizer(vocab=str(VOCAB_DIR / "vocab.json"), merges=str(VOCAB_DIR / "merges.txt"), pad_token="!")
    assert stock("wow!!! great!").input_ids == [49406, 2781, 0, 0, 0, 830, 0, 49407]  # the problem
    stock.save_pretrained(tmp_path / "tokenizer")
    tok = load_tokenizer("sd2", diffusers_dir=tmp_path)
    assert (tok.pad_token_id, tok("wow!!! great!").input_ids) == (0, [49406, 2781, 995, 830, 256, 49407])


def test_diffusers_folder_without_tokenizer_falls_back(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    assert load_tokenizer("sd2", diffusers_dir=tmp_path).pad_token_id == 0


def test_broken_diffusers_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer: cannot load the tokenizer there .*repair or remove"):
        load_tokenizer("sd1", diffusers_dir=tmp_path)


# --- cache folder ----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "pad"), [("sd1", 49407), ("sd2-v", 0)])
def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, pad: int) -> None:
    first = load_tokenizer(kind, cache_dir=tmp_path)
    family = "sd1" if kind == "sd1" else "sd2"
    folder = tmp_path / CACHE_NAMES[family]
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "CLIPTokenizer"

    def no_build(kind: str) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tok_mod, "build_tokenizer", no_build)
    second = load_tokenizer(kind, cache_dir=tmp_path)
    assert type(second) is SDCLIPTokenizer
    assert second.pad_token_id == first.pad_token_id == pad
    text = "wow!!! a photo of a cat"
    assert second(text, padding="max_length", max_length=12).input_ids == [
        49406, 2781, 995, 320, 1125, 539, 320, 2368, 49407, pad, pad, pad]
    assert second(text).input_ids == first(text).input_ids


def test_cache_names_are_the_original_tools() -> None:
    assert CACHE_NAMES == {"sd1": "openai_clip-vit-large-patch14", "sd2": "stabilityai_stable-diffusion-2",
                           "bigg": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"}


def test_cache_holds_both_kinds(tmp_path: Path) -> None:
    load_tokenizer("sd1", cache_dir=tmp_path)
    load_tokenizer("sd2", cache_dir=tmp_path)
    assert load_tokenizer("sd1", cache_dir=tmp_path).pad_token_id == 49407
    assert load_tokenizer("sd2", cache_dir=tmp_path).pad_token_id == 0


def test_empty_cache_subfolder_is_filled(tmp_path: Path) -> None:
    (tmp_path / CACHE_NAMES["sd1"]).mkdir()
    load_tokenizer("sd1", cache_dir=tmp_path)
    assert (tmp_path / CACHE_NAMES["sd1"] / "tokenizer.json").is_file()


def test_corrupt_cache(tmp_path: Path) -> None:
    folder = tmp_path / CACHE_NAMES["sd1"]
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the tokenizer there .*delete that folder"):
        load_tokenizer("sd1", cache_dir=tmp_path)


def test_cache_without_vocabulary(tmp_path: Path) -> None:
    folder = tmp_path / CACHE_NAMES["sd1"]
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a CLIP tokenizer for Stable Diffusion .*delete that folder"):
        load_tokenizer("sd1", cache_dir=tmp_path)


def test_cache_of_the_other_kind(tmp_path: Path) -> None:
    load_tokenizer("sd1").save_pretrained(tmp_path / CACHE_NAMES["sd2"])
    with pytest.raises(UserError, match="pads with id 49407, an SD2 tokenizer pads with 0; delete that folder"):
        load_tokenizer("sd2", cache_dir=tmp_path)


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"cannot save the tokenizer there .*pass a writable folder"):
        load_tokenizer("sd1", cache_dir=blocker / "cache")
    assert blocker.read_text() == "x"


def test_new_nested_cache_dir(tmp_path: Path) -> None:
    load_tokenizer("sd2", cache_dir=tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [CACHE_NAMES["sd2"]]


def test_cache_dir_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.write_text("x")
    with pytest.raises(UserError, match="--tokenizer_cache_dir .*cache: is a file, not a folder"):
        load_tokenizer("sd1", cache_dir=path)


def test_cache_save_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="library.models.tokenizer"):
        load_tokenizer("sd1", cache_dir=tmp_path)
    assert caplog.messages == [f"tokenizer: saved to the cache {tmp_path / CACHE_NAMES['sd1']}"]


# --- the shipped vocabulary and its builder -----------------------------------------------------


def test_shipped_files() -> None:
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)
    assert (vocab["Ā"], vocab["Ġ"], vocab["in"], vocab["cat</w>"]) == (188, 220, 512, 2368)
    assert merges[:3] == ["#version: 0.2", "i n", "t h"]
    assert merges[-1] == "" and len(merges) == 1 + 48894 + 1


def test_byte_symbols() -> None:
    symbols = build_clip_vocab.byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert symbols[:3] == ["!", '"', "#"]
    assert symbols[93:95] == ["~", "¡"]
    assert symbols[188:191] == ["Ā", "ā", "Ă"]  # byte 0, 1, 2
    assert symbols[220] == "Ġ"  # the space byte (32)
    assert symbols[-1] == "Ń"  # byte 173, the soft hyphen


def test_builder_on_a_small_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_clip_vocab, "NUM_MERGES", 3)
    gz = tmp_path / "bpe.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(["#version: test", "c a", "ca t</w>", "d o", "unused merge"]).encode()))
    merges = build_clip_vocab.read_merges(gz)
    assert merges == [("c", "a"), ("ca", "t</w>"), ("d", "o")]
    vocab = build_clip_vocab.build_vocab(merges)
    assert list(vocab.items())[512:] == [("ca", 512), ("cat</w>", 513), ("do", 514), ("<|startoftext|>", 515),
                                         ("<|endoftext|>", 516)]
    assert build_clip_vocab.main([str(gz), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "merges.txt").read_text() == "#version: 0.2\nc a\nca t</w>\nd o\n"
    assert (tmp_path / "out" / "vocab.json").read_text(encoding="utf-8").endswith(
        ',"ca":512,"cat</w>":513,"do":514,"<|startoftext|>":515,"<|endoftext|>":516}')


def test_builder_rejects_short_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gz = tmp_path / "bpe.txt.gz"
    gz.write_bytes(gzip.compress(b"#version\na b\n"))
    assert build_clip_vocab.main([str(gz), "--out", str(tmp_path / "out")]) == 2
    assert "needs 48894" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sdxl_second_tokenizer_is_cached_under_the_original_tools_name(tmp_path) -> None:
    first = load_tokenizer("sdxl-2", cache_dir=tmp_path)
    folder = tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert (folder / "tokenizer.json").is_file()
    again = load_tokenizer("sdxl-2", cache_dir=tmp_path)
    assert (first.pad_token_id, again.pad_token_id) == (0, 0)
    assert again("a cat!", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 256, 49407, 0, 0, 0]
