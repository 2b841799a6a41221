"""`hf-extrapolate toy-pair --out DIR`: build the toy base/RLVR pair (SFT, then DAPO with TRL) on this machine."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import CLIError

_STAGES = {"sft": "base (SFT)", "rl": "RLVR (DAPO)"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy-pair",
        help="train the built-in toy base/RLVR model pair (CPU, minutes)",
        description="Train a tiny LlamaForCausalLM on imperfect arithmetic traces (the base model), then RLVR it "
        "with DAPO (TRL GRPOTrainer, verifiable \\boxed{} reward) into the RL model. Writes DIR/base and DIR/rl "
        "as normal HF model folders with their tokenizer and a toy_pair.json of held-out accuracies.",
    )
    parser.add_argument("--out", required=True, help="output directory (DIR/base and DIR/rl are written)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole build (default: 0)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny smoke-test build in seconds (the pair is not meant to be good)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1: the same pair whatever the core count)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite DIR/base and DIR/rl if they exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hf_extrapolate.toy.train import ToyPairConfig, build_toy_pair

    existing = [d for d in ("base", "rl") if os.path.exists(os.path.join(args.out, d))]
    if existing and not args.force:
        raise CLIError(f"{args.out} already holds {', '.join(existing)}/; pass --force to overwrite.")
    overrides = {"seed": args.seed}
    if args.threads is not None:
        overrides["num_threads"] = args.threads
    config = ToyPairConfig.quick(**overrides) if args.quick else ToyPairConfig(**overrides)

    bars: dict[str, object] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.no_progress or stage not in _STAGES:  # evaluation takes seconds: no bar
            return
        from tqdm.auto import tqdm

        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():  # one bar at a time
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=_STAGES[stage], unit="step", leave=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    try:
        result = build_toy_pair(args.out, config, progress=progress)
    except ImportError as err:
        raise CLIError(str(err)) from err
    finally:
        for bar in bars.values():
            bar.close()
    summary = {
        "base": result.base_dir,
        "rl": result.rl_dir,
        "accuracy": result.accuracies,
        "eval_problems": config.eval_problems,
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0
