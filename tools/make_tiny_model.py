"""Write tiny SD1 / SD2 / SD2-v models with fixed random weights, in the real file layouts.

    python tools/make_tiny_model.py OUTDIR [--kinds sd1 sd2 sd2-v]

The files written are listed in `library/models/tiny_files.py`, which does the work; this is
its command line. Existing outputs are kept, so calling it again is free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.tiny import KINDS  # noqa: E402
from library.models.tiny_files import make_tiny_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    for name, path in make_tiny_models(args.outdir, tuple(args.kinds)).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
