"""Textual Inversion and Extended Textual Inversion (XTI) embeddings: files -> prompt words.

An embedding file adds one prompt word, its file name without the extension (matched
case-insensitively, as whole words: ``goodembed`` but not ``goodembedding``), that stands for
N learned vectors in the text encoder's input space. It works anywhere text does: positive
and negative prompts, inside weights (``(goodembed:1.2)``), next to ``BREAK``.

File formats read (`--textual_inversion_embeddings`):

* web UI ``.pt``: ``{"string_to_param": {"*": tensor[N, width]}, ...}``;
* ``.safetensors`` / ``.bin`` / ``.pt`` with an ``emb_params`` tensor (kohya's trainer, web UI);
* any of those holding a single tensor (Diffusers' ``learned_embeds.bin`` is ``{"<token>": tensor[width]}``).

Pickles are read with ``torch.load(weights_only=True)``, so a file that wants to run code is
refused.

SDXL embeddings hold two tensors, ``clip_l`` (for CLIP ViT-L, 768 wide on SDXL) and ``clip_g``
(for OpenCLIP bigG, 1280 wide), with the same number of vectors. The prompt word is the same
for both tokenizers and gets the same private ids in both; each encoder looks them up in its
own table (`EmbeddingSet.for_encoder(1)` is the view for the second encoder). An SDXL
embedding on SD 1.x/2.x and a single-encoder embedding on SDXL are refused with one line;
XTI exists for SD 1.x/2.x only.

XTI files (`--XTI_embeddings`) hold one ``[N, width]`` tensor per U-Net cross-attention layer,
keyed by the layer's name in the original (LDM) layout: ``IN01``, ``IN02``, ``IN04``, ... ,
``MID``, ``OUT03`` ... ``OUT11`` for SD 1.x/2.x (see `library.features.xti` for how names come from the
U-Net). Each layer then conditions on a text encoding whose XTI vectors are that layer's.

How the vectors reach the text encoder (why not tokenizer tokens): prompts are split at
embedding names *before* tokenizing (`EmbeddingSet.split`), and each name becomes N private
token ids just past the tokenizer's vocabulary (``vocab_size + k``). While the prompt encoder
runs the text encoder, `EmbeddingSet.installed` swaps the token-embedding module for one that
looks those ids up in this set's table (for XTI: the table of one U-Net layer) and puts the
original module back afterwards. So the tokenizer and the model's weights are never changed,
a name may even be an ordinary word (the embedding wins, as in the web UI), and XTI only has to
swap a small table per layer.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from library.errors import UserError, first_line
from library.models.loader import text_model

logger = logging.getLogger(__name__)

TI_OPTION = "--textual_inversion_embeddings"
XTI_OPTION = "--XTI_embeddings"
EmbeddingFormat = Literal["pt", "safetensors", "bin"]


@dataclass(frozen=True)
class Embedding:
    """One prompt word and its vectors: `vectors` for TI, one tensor per layer in `layers` for XTI."""

    name: str
    path: Path
    vectors: torch.Tensor | None = None  # (N, width), float32
    layers: dict[str, torch.Tensor] | None = None  # layer name -> (N, width), float32
    vectors_2: torch.Tensor | None = None  # SDXL's second encoder (clip_g): (N, width 2), float32

    @property
    def size(self) -> int:
        """Number of vectors (tokens) the word stands for."""
        if self.vectors is not None:
            return int(self.vectors.shape[0])
        return int(next(iter(self.layers.values())).shape[0])

    def vectors_for(self, layer: str | None, encoder: int = 0) -> torch.Tensor:
        """The vectors used for U-Net layer `layer` (TI: the same for every layer) by text
        encoder `encoder` (1: SDXL's second, which takes `vectors_2`)."""
        if encoder == 1:
            if self.vectors_2 is None:
                raise ValueError(f"embedding {self.name!r} has no vectors for a second text encoder")
            return self.vectors_2
        if self.layers is None:
            return self.vectors
        if layer is None:
            raise ValueError(f"XTI embedding {self.name!r} needs a U-Net layer name")
        return self.layers[layer]


@dataclass
class EmbeddingSet:
    """The embeddings of a run: which prompt words they are, their token ids, their vectors.

    `base_vocab` is the text encoder's vocabulary size; embedding k's vectors get the ids
    ``base_vocab + offset_k ... base_vocab + offset_k + N_k - 1``. `layer_names` is the U-Net's
    cross-attention layer order (XTI only; empty without XTI). `encoder` is the text encoder
    whose vectors `installed` puts in (1: SDXL's second; see `for_encoder`).
    """

    base_vocab: int
    embeddings: list[Embedding] = field(default_factory=list)
    layer_names: tuple[str, ...] = ()
    encoder: int = 0
    _ids: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False)
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False)
    _tables: dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _xti_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        names: dict[str, Embedding] = {}
        next_id = self.base_vocab
        for emb in self.embeddings:
            key = emb.name.lower()
            if key in names:
                raise UserError(
                    f"{emb.path} and {names[key].path} both define the prompt word {emb.name!r}; "
                    "rename one of the files"
                )
            names[key] = emb
            self._ids[key] = tuple(range(next_id, next_id + emb.size))
            next_id += emb.size
        self._xti_ids = frozenset(
            t for emb in self.embeddings if emb.layers is not None for t in self._ids[emb.name.lower()]
        )
        if names:
            alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @property
    def has_xti(self) -> bool:
        """Whether any embedding differs per U-Net layer."""
        return any(emb.layers is not None for emb in self.embeddings)

    def split(self, text: str) -> list[str | tuple[int, ...]]:
        """`text` as plain-text pieces and token-id tuples (one tuple per embedding word)."""
        if self._pattern is None:
            return [text]
        parts: list[str | tuple[int, ...]] = []
        position = 0
        for match in self._pattern.finditer(text):
            if match.start() > position:
                parts.append(text[position : match.start()])
            parts.append(self._ids[match.group(0).lower()])
            position = match.end()
        if position < len(text):
            parts.append(text[position:])
        return parts

    def for_encoder(self, encoder: int) -> EmbeddingSet:
        """This set for text encoder `encoder` (0 or SDXL's second, 1): the same words and ids,
        that encoder's vectors."""
        if encoder == self.encoder:
            return self
        return EmbeddingSet(self.base_vocab, self.embeddings, self.layer_names, encoder)

    def is_xti_id(self, token: int) -> bool:
        """Whether `token` belongs to an XTI embedding (its vector differs per layer)."""
        return token in self._xti_ids

    def table(self, layer: str | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """All embeddings' vectors for `layer`, row i being id ``base_vocab + i`` (cached)."""
        key = (layer, dtype, device)
        cached = self._tables.get(key)
        if cached is None:
            rows = [emb.vectors_for(layer, self.encoder) for emb in self.embeddings]
            cached = torch.cat(rows).to(device=device, dtype=dtype)
            self._tables[key] = cached
        return cached

    @contextmanager
    def installed(self, text_encoder: torch.nn.Module, layer: str | None = None) -> Iterator[None]:
        """While inside, `text_encoder` maps this set's ids to its vectors (of `layer` for XTI)."""
        if not self.embeddings:
            yield
            return
        embeddings = text_model(text_encoder).embeddings
        original = embeddings.token_embedding
        table = self.table(layer, original.weight.dtype, original.weight.device)
        embeddings.token_embedding = _ExtendedTokenEmbedding(original, table)
        try:
            yield
        finally:
            embeddings.token_embedding = original


class _ExtendedTokenEmbedding(torch.nn.Module):
    """A token embedding whose ids past the vocabulary index an extra table of vectors."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("extra", extra, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        is_extra = ids >= vocab
        out = self.base(ids.masked_fill(is_extra, 0))
        if bool(is_extra.any()):
            out = out.clone()
            out[is_extra] = self.extra[ids[is_extra] - vocab].to(out.dtype)
        return out


# --- loading ----------------------------------------------------------------------------------


def load_embeddings(
    ti_files: Sequence[str] | None,
    xti_files: Sequence[str] | None,
    text_encoder: torch.nn.Module,
    unet: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> EmbeddingSet | None:
    """The EmbeddingSet of `--textual_inversion_embeddings` and `--XTI_embeddings` (None if both empty).

    With `text_encoder_2` (SDXL) every file must be an SDXL embedding (``clip_l`` + ``clip_g``);
    the set is the first encoder's, `for_encoder(1)` the second's.
    """
    ti_files, xti_files = list(ti_files or []), list(xti_files or [])
    if not ti_files and not xti_files:
        return None
    token_embedding = text_model(text_encoder).embeddings.token_embedding
    width = token_embedding.embedding_dim
    if text_encoder_2 is not None:
        if xti_files:
            raise UserError(f"{XTI_OPTION} {xti_files[0]}: XTI embeddings work with SD 1.x/2.x only, not SDXL")
        width_2 = text_model(text_encoder_2).embeddings.token_embedding.embedding_dim
        loaded = [load_sdxl_embedding(f, width, width_2) for f in ti_files]
    else:
        loaded = [load_textual_inversion(f, width) for f in ti_files]
    layer_names: tuple[str, ...] = ()
    if xti_files:
        from library.models.unet_blocks import cross_attention_layer_names

        if unet is None:
            raise ValueError("XTI embeddings need the U-Net (its cross-attention layer names)")
        layer_names = tuple(cross_attention_layer_names(unet))
        loaded += [load_xti(f, width, layer_names) for f in xti_files]
    result = EmbeddingSet(token_embedding.num_embeddings, loaded, layer_names)
    for emb in loaded:
        kind = "XTI embedding" if emb.layers is not None else "embedding"
        logger.info("%s %r: %d vector(s) from %s", kind, emb.name, emb.size, emb.path.name)
    return result


def load_textual_inversion(file: str | Path, width: int) -> Embedding:
    """A Textual Inversion file as an Embedding; checks that its vectors are `width` wide."""
    path = _existing(file, TI_OPTION)
    data = read_embedding_file(path, TI_OPTION)
    vectors = _as_matrix(_ti_tensor(data, path), path, TI_OPTION)
    _check_width(vectors, width, path, TI_OPTION)
    return Embedding(path.stem, path, vectors=vectors)


def load_sdxl_embedding(file: str | Path, width: int, width_2: int) -> Embedding:
    """An SDXL embedding (``clip_l`` `width` wide, ``clip_g`` `width_2` wide, as many vectors)."""
    path = _existing(file, TI_OPTION)
    data = read_embedding_file(path, TI_OPTION)
    if "clip_l" not in data or "clip_g" not in data:
        raise UserError(f"{TI_OPTION} {path}: not an SDXL embedding (no clip_l and clip_g tensors); "
                        "SDXL needs an embedding trained for SDXL")
    first = _as_matrix(data["clip_l"], path, TI_OPTION)
    second = _as_matrix(data["clip_g"], path, TI_OPTION)
    _check_width(first, width, path, TI_OPTION, "SDXL: clip_l 768, clip_g 1280")
    _check_width(second, width_2, path, TI_OPTION, "SDXL: clip_l 768, clip_g 1280")
    if first.shape[0] != second.shape[0]:
        raise UserError(f"{TI_OPTION} {path}: clip_l holds {first.shape[0]} vectors but clip_g {second.shape[0]}; "
                        "damaged file?")
    return Embedding(path.stem, path, vectors=first, vectors_2=second)


def load_xti(file: str | Path, width: int, layer_names: Sequence[str]) -> Embedding:
    """An XTI file as an Embedding with one tensor per U-Net cross-attention layer."""
    path = _existing(file, XTI_OPTION)
    data = read_embedding_file(path, XTI_OPTION)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if set(tensors) != set(layer_names):
        hint = "; it looks like a plain embedding, use --textual_inversion_embeddings" if (
            "emb_params" in data or "string_to_param" in data or len(tensors) == 1
        ) else " (it was made for a U-Net of another layout)"
        raise UserError(
            f"{XTI_OPTION} {path}: holds layers {', '.join(sorted(map(str, data))) or 'none'} but this U-Net's "
            f"cross-attention layers are {', '.join(layer_names)}{hint}"
        )
    layers = {name: _as_matrix(tensors[name], path, XTI_OPTION) for name in layer_names}
    counts = {int(t.shape[0]) for t in layers.values()}
    if len(counts) != 1:
        raise UserError(f"{XTI_OPTION} {path}: layers hold different numbers of vectors ({sorted(counts)}); "
                        "damaged file?")
    for tensor in layers.values():
        _check_width(tensor, width, path, XTI_OPTION)
    return Embedding(path.stem, path, layers=layers)


def read_embedding_file(path: Path, option: str) -> dict:
    """The top-level dictionary of a `.safetensors` or pickle (`weights_only`) file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise UserError(f"{option} {path}: not a readable safetensors file ({first_line(exc, 160)})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{option} {path}: refused: the pickle holds objects other than tensors and plain data "
            f"({first_line(exc, 100)}); get or convert a .safetensors version"
        ) from None
    except Exception as exc:
        raise UserError(f"{option} {path}: not a readable embedding file ({first_line(exc, 160)})") from None
    if isinstance(data, torch.Tensor):
        return {"emb_params": data}
    if not isinstance(data, dict):
        raise UserError(f"{option} {path}: holds a {type(data).__name__}, not a dictionary of tensors")
    return data


def _ti_tensor(data: dict, path: Path) -> torch.Tensor:
    """The vectors of a TI file in any of the supported layouts."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        tensors = [v for v in params.values() if isinstance(v, torch.Tensor)] if isinstance(params, dict) else []
        if len(tensors) != 1:
            raise UserError(f"{TI_OPTION} {path}: string_to_param must hold exactly one tensor, found {len(tensors)}")
        return tensors[0]
    if "emb_params" in data:
        return data["emb_params"]
    if "clip_l" in data or "clip_g" in data:
        raise UserError(f"{TI_OPTION} {path}: an SDXL embedding (clip_l/clip_g); SD 1.x/2.x need a single-encoder one")
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:
        return tensors[0]
    keys = ", ".join(sorted(map(str, data))[:6]) or "none"
    raise UserError(
        f"{TI_OPTION} {path}: no embedding found (keys: {keys}); expected string_to_param (web UI .pt), "
        "emb_params or a single tensor"
    )


def _as_matrix(tensor: torch.Tensor, path: Path, option: str) -> torch.Tensor:
    """`tensor` as float32 (N, width): a single vector becomes one row."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise UserError(f"{option} {path}: the embedding is not a floating-point tensor")
    matrix = tensor.detach().to(torch.float32)
    if matrix.ndim == 1:
        matrix = matrix.unsqueeze(0)
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise UserError(f"{option} {path}: expected vectors of shape [N, width], found {list(tensor.shape)}")
    return matrix.contiguous()


def _check_width(vectors: torch.Tensor, width: int, path: Path, option: str,
                 hint: str = "SD 1.x: 768, SD 2.x: 1024") -> None:
    if vectors.shape[1] != width:
        raise UserError(
            f"{option} {path}: its vectors are {vectors.shape[1]} wide but this model's text encoder takes "
            f"{width}; use an embedding trained for this model family ({hint})"
        )


def _existing(file: str | Path, option: str) -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{option} {file}: no such file")
    return path


# --- writing (tests, tools) -------------------------------------------------------------------


def write_embedding(path: str | Path, vectors: torch.Tensor, fmt: EmbeddingFormat | None = None) -> Path:
    """Write a TI file: `pt` (web UI layout), `safetensors` (`emb_params`) or `bin` (Diffusers).

    The format defaults to the file's suffix. Used by tests and handy for converting files.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")  # type: ignore[assignment]
    vectors = vectors.detach().contiguous()
    if fmt == "pt":
        record = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 0}
        torch.save(record, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(path))
    elif fmt == "bin":
        torch.save({f"<{path.stem}>": vectors}, path)
    else:
        raise ValueError(f"unknown embedding format {fmt!r}; expected pt, safetensors or bin")
    return path


def write_sdxl_embedding(path: str | Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """Write an SDXL embedding: a safetensors file with `clip_l` and `clip_g` tensors."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({"clip_l": clip_l.detach().contiguous(), "clip_g": clip_g.detach().contiguous()}, str(path))
    return path


def write_xti(path: str | Path, layers: dict[str, torch.Tensor]) -> Path:
    """Write an XTI safetensors file: one `[N, width]` tensor per layer name."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({name: t.detach().clone().contiguous() for name, t in layers.items()}, str(path))
    return path
