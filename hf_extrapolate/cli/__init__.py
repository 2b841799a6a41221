"""`hf-extrapolate` command line: one sub-command per module of this package.

Each sub-command module defines `register(subparsers)`, which adds its parser and sets `handler` to a function
`(args) -> int`. Errors a user can fix (missing model, bad config, mismatched tokenizers) are raised as `CLIError`
or `ValueError`/`TypeError`/`OSError` and printed as one line, not a traceback (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# sub-command modules, in the order `--help` lists them
SUBCOMMANDS = ("demo", "generate", "analyze", "eval", "sweep", "toy-pair")


class CLIError(Exception):
    """An error whose message is the whole story for the user (printed as one line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-extrapolate",
        description="Selective token replacement and test-time extrapolation along the direction of RLVR updates.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (CLIError, ValueError, TypeError, OSError, KeyError) as err:
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"hf-extrapolate {args.command}: error: {msg}\n")
        return 2


if __name__ == "__main__":  # `python -m hf_extrapolate.cli`
    sys.exit(main())
