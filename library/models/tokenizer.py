"""The CLIP tokenizers for Stable Diffusion 1.x / 2.x / XL, built offline from files shipped with the project.

`load_tokenizer(kind)` returns a Hugging Face `CLIPTokenizer` whose token ids are those of
`openai/clip-vit-large-patch14` (SD1's text encoder; SD2's OpenCLIP ViT-H uses the same
vocabulary): ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407, 49,408 tokens, 48,894 merges,
77 tokens a sequence. SDXL has two tokenizers over that same vocabulary: kind ``"sdxl"`` is
its CLIP ViT-L one (as SD1's), kind ``"sdxl-2"`` its OpenCLIP ViT-bigG one (``!`` pads, as
SD2's). The vocabulary lives in `library/models/clip_tokenizer/` (made by
`tools/build_clip_vocab.py`), so nothing is downloaded.

Where the tokenizer comes from, first match wins:

1. ``<diffusers_dir>/tokenizer/`` (``tokenizer_2/`` for ``"sdxl-2"``) when a Diffusers model
   folder is given and has one: its files are used as they are (vocabulary, special tokens,
   padding);
2. ``<cache_dir>/<name>/`` (the ``--tokenizer_cache_dir`` option) when it holds a saved
   tokenizer; ``<name>`` is ``openai_clip-vit-large-patch14`` for SD1 and
   ``stabilityai_stable-diffusion-2`` for SD2 and ``laion_CLIP-ViT-bigG-14-laion2B-39B-b160k``
   for SDXL's second tokenizer, the folder names the original `gen_img.py` uses, so its
   caches are reused;
3. the shipped vocabulary, saved into ``<cache_dir>/<name>/`` when a cache folder is given.

Decisions, each tested in `tests/models/test_tokenizer.py`:

* Padding: SD1 pads with ``<|endoftext|>`` (49407); SD2 pads with ``!`` (id 0), as OpenCLIP
  pads with zeros. The pad token only pads: ``!`` in a prompt is tokenized as ordinary text,
  so ``"wow!!! great!"`` gives the BPE ids OpenCLIP gives (``!!!`` is one token, 995). A stock
  `CLIPTokenizer` built with ``pad_token="!"`` would make ``!`` an unsplittable special token
  and turn every ``!`` into id 0; `SDCLIPTokenizer` keeps a pad token that is an ordinary
  vocabulary entry out of the tokenizer's added (never-split) tokens.
* Text cleaning: like the original tool (transformers' Python `CLIPTokenizer` with `ftfy`
  installed), text goes through ``ftfy.fix_text``, whitespace runs become one space and it is
  lower-cased. transformers 5's Rust-backed `CLIPTokenizer` skips `ftfy`, so
  `SDCLIPTokenizer` applies it before encoding. ftfy unescapes HTML entities (``&amp;`` ->
  ``&``, also when double-escaped) unless the text contains ``<`` or ``>``; OpenCLIP's
  tokenizer additionally unescapes those (``"<b>&amp;</b>"``), this one does not.
* ``<|startoftext|>`` / ``<|endoftext|>`` typed in a prompt map to 49406 / 49407, as in the
  original tool (open-clip 3.x's tokenizer spells its specials differently and splits them).
* `load_tokenizer` returns a new tokenizer on each call (about 30 ms), so one caller adding
  textual-inversion tokens does not change another's tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import ftfy
from transformers import CLIPTokenizer

from library.errors import UserError, first_line

logger = logging.getLogger(__name__)

#: Folder of the shipped `vocab.json` and `merges.txt`.
VOCAB_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
#: Pad token per tokenizer family: SD1 (and SDXL's CLIP ViT-L) pads with the end token, SD2
#: and SDXL's bigG with "!" (id 0).
PAD_TOKENS = {"sd1": EOS_TOKEN, "sd2": "!", "bigg": "!"}
PAD_IDS = {"sd1": EOS_ID, "sd2": 0, "bigg": 0}
#: Sub-folder of ``cache_dir`` per family: the original tool's names (hub path, "/" -> "_").
CACHE_NAMES = {"sd1": "openai_clip-vit-large-patch14", "sd2": "stabilityai_stable-diffusion-2",
               "bigg": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"}
#: Model kind -> tokenizer family; SDXL's second tokenizer is kind "sdxl-2".
_FAMILIES = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sd1", "sdxl-2": "bigg"}
#: Sub-folder of a Diffusers model folder holding the tokenizer of a family.
_SUBFOLDERS = {"bigg": "tokenizer_2"}


def clean_text(text: str) -> str:
    """Clean a prompt as CLIP's tokenizers do: ftfy fixes, one space between words, lower case."""
    return " ".join(ftfy.fix_text(text).split()).lower()


class SDCLIPTokenizer(CLIPTokenizer):
    """A `CLIPTokenizer` that cleans text with ftfy and leaves a pad token like ``!`` as text.

    Two differences from transformers' class, both so that token ids match CLIP / OpenCLIP
    (see the module docstring): prompts are cleaned with `clean_text` before encoding, and a
    pad token that is an ordinary vocabulary entry (SD2's ``!``) is not registered as an
    added token, so it is only used for padding and ``!`` in a prompt stays BPE text. Saved
    folders say ``"tokenizer_class": "CLIPTokenizer"`` so that other tools can read them (the
    stock class, loading an SD2 folder, makes ``!`` a never-split token again).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Defining __init__ makes transformers rebuild the backend from vocabulary and merges
        # (also when loading a tokenizer.json), so every added token passes `_add_tokens`.
        super().__init__(*args, **kwargs)

    def _text_pad_tokens(self) -> set[str]:
        """The pad token when it is an ordinary BPE vocabulary entry rather than a special one."""
        pad = self.pad_token
        if pad is None or str(pad) in {BOS_TOKEN, EOS_TOKEN, str(self.unk_token)}:
            return set()
        return {str(pad)} if self.backend_tokenizer.model.token_to_id(str(pad)) is not None else set()

    def _add_tokens(self, new_tokens: list[Any], special_tokens: bool = False) -> int:
        """Add tokens to the never-split list, except a pad token that is ordinary text."""
        skip = self._text_pad_tokens()
        kept = [token for token in new_tokens if str(token) not in skip]
        return super()._add_tokens(kept, special_tokens=special_tokens) if kept else 0

    def _encode_plus(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Clean raw text (a string or a batch of strings) before transformers encodes it."""
        if not kwargs.get("is_split_into_words"):
            text, text_pair = _clean_any(text), _clean_any(text_pair)
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Save like `CLIPTokenizer` does, naming the stock class in `tokenizer_config.json`."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = Path(save_directory) / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["tokenizer_class"] = "CLIPTokenizer"
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


def _clean_any(text: Any) -> Any:
    """`clean_text` applied to a string or to each string of a list/tuple; anything else as is."""
    if isinstance(text, str):
        return clean_text(text)
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [clean_text(t) for t in text]
    return text


def _family(kind: str) -> str:
    """The tokenizer family ("sd1", "sd2", "bigg") of a model kind; ValueError for an unknown kind (a bug)."""
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_FAMILIES)}") from None


def build_tokenizer(kind: str) -> SDCLIPTokenizer:
    """A new tokenizer for ``kind`` ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-2") from the shipped vocabulary.

    The file paths go straight to the `tokenizers` backend, which reads them in Rust: about
    30 ms, against 45 ms (up to 0.15 s when Python's garbage collector runs meanwhile) for
    parsing 49k vocabulary entries and merges into Python objects first.
    """
    family = _family(kind)
    tokenizer = SDCLIPTokenizer(
        vocab=str(VOCAB_DIR / "vocab.json"),
        merges=str(VOCAB_DIR / "merges.txt"),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKENS[family],
        model_max_length=MAX_LENGTH,
    )
    if tokenizer.vocab_size != VOCAB_SIZE:
        raise RuntimeError(f"{VOCAB_DIR}: damaged vocabulary files; rebuild them with tools/build_clip_vocab.py")
    return tokenizer


def _check_clip_vocab(tokenizer: CLIPTokenizer, folder: Path, fix: str) -> None:
    """UserError unless ``tokenizer`` has CLIP's vocabulary size and start/end token ids."""
    ids = (tokenizer.convert_tokens_to_ids(BOS_TOKEN), tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    if tokenizer.vocab_size != VOCAB_SIZE or ids != (BOS_ID, EOS_ID):
        raise UserError(
            f"{folder}: not a CLIP tokenizer for Stable Diffusion (vocabulary of {tokenizer.vocab_size} tokens, "
            f"start/end ids {ids[0]}/{ids[1]}; expected {VOCAB_SIZE} and {BOS_ID}/{EOS_ID}); {fix}"
        )


def _load_folder(folder: Path, fix: str) -> SDCLIPTokenizer:
    """Load a saved tokenizer folder without network; unreadable contents raise UserError."""
    try:
        tokenizer = SDCLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, JSONDecodeError, ...
        raise UserError(f"{folder}: cannot load the tokenizer there ({first_line(exc, None)}); {fix}") from exc
    _check_clip_vocab(tokenizer, folder, fix)
    return tokenizer


def _load_from_cache(folder: Path, family: str) -> SDCLIPTokenizer:
    """Load a tokenizer that the tool (or the original tool) saved in the cache folder."""
    fix = "delete that folder so it is rebuilt, or pass another --tokenizer_cache_dir"
    tokenizer = _load_folder(folder, fix)
    if tokenizer.pad_token_id != PAD_IDS[family]:
        raise UserError(
            f"{folder}: cached tokenizer pads with id {tokenizer.pad_token_id}, {_FAMILY_TEXT[family]} "
            f"pads with {PAD_IDS[family]}; {fix}"
        )
    return tokenizer


_FAMILY_TEXT = {"sd1": "an SD1 tokenizer", "sd2": "an SD2 tokenizer", "bigg": "SDXL's second (bigG) tokenizer"}


def load_tokenizer(kind: str, diffusers_dir: Path | None = None, cache_dir: Path | None = None) -> SDCLIPTokenizer:
    """The CLIP tokenizer for a model of ``kind`` ("sd1", "sd2", "sd2-v", "sdxl" or SDXL's
    second, "sdxl-2"), without network.

    ``diffusers_dir``: a Diffusers model folder; its ``tokenizer/`` sub-folder (SDXL's second:
    ``tokenizer_2/``), when present, is loaded as it is. ``cache_dir`` (``--tokenizer_cache_dir``): a tokenizer saved there for
    this kind is loaded; otherwise the shipped one is built and saved there for later runs.
    A folder whose contents cannot be loaded raises `UserError`. Each call returns a new
    tokenizer object. See the module docstring for how text is tokenized.
    """
    family = _family(kind)
    if diffusers_dir is not None:
        folder = Path(diffusers_dir) / _SUBFOLDERS.get(family, "tokenizer")
        if folder.is_dir():
            logger.debug("tokenizer: from the Diffusers folder %s", folder)
            return _load_folder(folder, f"repair or remove {folder} to use the built-in CLIP tokenizer")
    if cache_dir is None:
        return build_tokenizer(kind)

    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--tokenizer_cache_dir {cache_dir}: is a file, not a folder; pass a folder path")
    folder = cache_dir / CACHE_NAMES[family]
    if folder.is_file():
        raise UserError(f"--tokenizer_cache_dir: {folder} is a file, not a folder; delete it so it is rebuilt")
    if folder.is_dir() and any(folder.iterdir()):
        logger.debug("tokenizer: from the cache %s", folder)
        return _load_from_cache(folder, family)

    tokenizer = build_tokenizer(kind)
    _save_to_cache(tokenizer, folder, cache_dir)
    return tokenizer


def _save_to_cache(tokenizer: SDCLIPTokenizer, folder: Path, cache_dir: Path) -> None:
    """Save into a temporary sibling folder, then rename it, so no run sees a half-written cache."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        tokenizer.save_pretrained(partial)
        if folder.is_dir():
            folder.rmdir()  # an empty folder left by the user; a non-empty one was loaded above
        partial.rename(folder)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if folder.is_dir() and any(folder.iterdir()):
            return  # another run saved it meanwhile
        raise UserError(f"--tokenizer_cache_dir {cache_dir}: cannot save the tokenizer there ({exc}); "
                        "pass a writable folder") from exc
    logger.info("tokenizer: saved to the cache %s", folder)
