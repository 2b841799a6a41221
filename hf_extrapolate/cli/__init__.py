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


# models below this size run on one CPU thread by default (see `choose_threads`)
SMALL_MODEL_PARAMETERS = 100_000_000


class CLIError(Exception):
    """An error whose message is the whole story for the user (printed as one line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-extrapolate",
        description="Selective token replacement and test-time extrapolation along the direction of RLVR updates.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: 1 for small models on CPU -- the demo, checkpoints under "
                        f"{SMALL_MODEL_PARAMETERS // 10**6}M parameters -- where more threads were 3-6x slower on a busy "
                        "2-core box; otherwise torch's default, or OMP_NUM_THREADS)")
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
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads must be >= 1 (got {args.threads})")
            import torch

            torch.set_num_threads(args.threads)
        return int(args.handler(args) or 0)
    except (CLIError, ValueError, TypeError, OSError, KeyError) as err:
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"hf-extrapolate {args.command}: error: {msg}\n")
        return 2


def choose_threads(args: argparse.Namespace, *models) -> None:
    """One torch thread for small models on CPU unless `--threads` or OMP_NUM_THREADS says otherwise: their matrix
    products are too small to gain from threads, and on a busy machine extra threads only contend."""
    import os

    import torch

    if getattr(args, "threads", None) is not None or os.environ.get("OMP_NUM_THREADS"):
        return
    on_cpu = all(getattr(m, "device", torch.device("cpu")).type == "cpu" for m in models)
    size = sum(p.numel() for m in models for p in m.parameters())
    if on_cpu and size < SMALL_MODEL_PARAMETERS and torch.get_num_threads() != 1:
        logging.getLogger(__name__).info("small models on CPU (%d parameters): 1 torch thread (--threads N to change)",
                                         size)
        torch.set_num_threads(1)


if __name__ == "__main__":  # `python -m hf_extrapolate.cli`
    sys.exit(main())
