"""Prompt sources and prompt lines: files, the terminal, `--from_module`; line options (`--n`,
`--w`, ...), `{a|b}` variants, per-image seeds -> frozen Jobs.
"""
