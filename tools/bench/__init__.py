"""The benchmarks, one module each, run through one entry: `python -m tools.bench COMMAND [options]`.

`common` holds what they share (the full-size random model, timing order, peak memory, the
record of the machine) and imports none of them; `report` runs several of the others; nothing
imports `report`. See docs/performance.md for what each command measures.
"""
