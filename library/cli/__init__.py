"""The command line: argparse options grouped like the manual, their checks, the input-file
preflight, logging set-up.
"""
