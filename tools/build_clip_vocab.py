"""Build the Hugging Face CLIP tokenizer files (`vocab.json`, `merges.txt`) from CLIP's BPE file.

The project ships the CLIP vocabulary so that no run needs a model hub. This tool regenerates
`library/models/clip_tokenizer/` from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, the file that
the PyPI package `open-clip-torch` ships inside its wheel. To get it without installing
open-clip (which pulls torchvision)::

    pip download --no-deps -d /tmp/oc open-clip-torch
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python tools/build_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

Construction (the layout of OpenAI CLIP and of `openai/clip-vit-large-patch14`):

* merges: lines ``1 .. 48894`` of the BPE file (line 0 is a version comment; the file holds
  more merges than CLIP uses, which keeps ``49152 - 256 - 2`` of them);
* vocabulary, in id order: the 256 byte symbols of GPT-2's reversible byte-to-unicode map,
  the same 256 symbols with the end-of-word marker ``</w>``, every merge's two halves joined,
  then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 entries.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

#: How many merges CLIP keeps from the BPE file: a 49,152-entry vocabulary less the 256 byte
#: symbols and the two special tokens, counted without the end-of-word copies of the bytes.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "library" / "models" / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """The 256 printable symbols standing for bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and
    come first, in byte order; the remaining bytes (controls, space, soft hyphen, ...) are
    given the code points 256, 257, ... in byte order and come after them.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses, as pairs, from a gzipped BPE file; raises ValueError when malformed."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    chosen = lines[1 : NUM_MERGES + 1]
    if len(chosen) != NUM_MERGES:
        raise ValueError(f"{bpe_gz}: holds {len(chosen)} merges after its header, CLIP needs {NUM_MERGES}")
    merges = []
    for number, line in enumerate(chosen, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{bpe_gz}: line {number} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token-to-id map for the given merges (see the module docstring for the order)."""
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce duplicate vocabulary entries")
    return vocab


def write_files(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: Path) -> tuple[Path, Path]:
    """Write `vocab.json` (compact UTF-8 JSON) and `merges.txt` (HF header, one merge a line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    merges_path.write_text("\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not args.bpe_gz.is_file():
        print(f"error: {args.bpe_gz}: no such file; pass the path of bpe_simple_vocab_16e6.txt.gz", file=sys.stderr)
        return 2
    try:
        merges = read_merges(args.bpe_gz)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"error: {args.bpe_gz}: not a CLIP BPE file ({exc})", file=sys.stderr)
        return 2
    vocab = build_vocab(merges)
    for path in write_files(vocab, merges, args.out):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    print(f"{len(vocab):,} tokens, {len(merges):,} merges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
