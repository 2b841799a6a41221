"""`hf-extrapolate sweep`: accuracy against replacement ratio per criterion (the paper's Fig. 2) and over gamma
(Table 5).

Thresholds are given (`--thresholds`) or calibrated per criterion to target replacement ratios (`--target-ratios`) on
responses sampled from the proposal model for the first `--calibration-problems` problems. Every (criterion,
threshold, gamma) becomes a mode — replacement for gamma 0, extrapolation otherwise — evaluated with the base and RL
endpoints on the same prompts and seeds, into one resumable result file.

`--engine vllm`: one vLLM engine evaluates every sweep point (each a per-request config, all points of a batch of
problems in one call). Calibration reads per-token statistics of every criterion from the transformers engine, so it
runs there: `--target-ratios ... --calibrate-only` writes the calibrated thresholds into the summary, and
`--thresholds-from THAT.summary.json --engine vllm` sweeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from ..config import CRITERIA, ExtrapolationConfig
from . import CLIError
from .engines import add_engine_arguments
from .eval import (
    add_config_arguments,
    add_data_arguments,
    add_model_arguments,
    add_output_arguments,
    add_sampling_arguments,
    config_overrides,
    load_pair,
    load_problems_arg,
    process_state,
    progress_bar,
    run_and_report,
    summary_path,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="accuracy vs replacement ratio per criterion (Fig. 2) and over gamma (Table 5)",
        description="Evaluate selective replacement / extrapolation over thresholds (given, or calibrated to target "
        "replacement ratios) and gammas, with the base and RL models as endpoints; writes records, a summary and "
        "(with --plots) accuracy-vs-ratio and per-problem plots.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    group = parser.add_argument_group("sweep")
    group.add_argument("--criteria", nargs="+", default=["logp_diff"], choices=CRITERIA,
                       help="criteria to sweep (default: logp_diff)")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--target-ratios", nargs="+", type=float, metavar="R",
                       help="calibrate each criterion's threshold to these replacement ratios, e.g. 0.05 0.1 0.2")
    which.add_argument("--thresholds", nargs="+", type=float, metavar="TAU",
                       help="use these thresholds for every criterion")
    which.add_argument("--thresholds-from", metavar="SUMMARY.json",
                       help="use the thresholds an earlier sweep calibrated (its summary's calibrated_thresholds, e.g. "
                       "from --target-ratios ... --calibrate-only); the way to sweep calibrated thresholds with "
                       "--engine vllm")
    group.add_argument("--calibrate-only", action="store_true",
                       help="with --target-ratios: write the calibrated thresholds to the summary and stop")
    group.add_argument("--gammas", nargs="+", type=float, default=[0.0],
                       help="extrapolation strengths; 0 = replacement (default: 0)")
    group.add_argument("--calibration-problems", type=int, default=16,
                       help="problems (from the start of --data) whose responses calibrate thresholds; they are "
                       "evaluated too (pass a separate --data split to hold them out) (default: 16)")
    group.add_argument("--no-endpoints", action="store_true", help="do not evaluate the base and RL models")
    add_config_arguments(parser, criterion=False, gamma=False)
    add_sampling_arguments(parser)
    add_engine_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(handler=run)


def calibrate(args: argparse.Namespace, rl_model, base_model, tokenizer, problems) -> dict[str, dict[str, float]]:
    """`{criterion: {ratio: threshold}}` from proposal responses to the first `--calibration-problems` problems."""
    import torch

    from ..analysis import sample_statistics
    from ..evaluation import build_prompt
    from ..evaluation.generation import encode_prompts, eos_token_ids
    from ..evaluation.runner import batch_seed

    if args.calibration_problems < 1:
        raise CLIError(f"--calibration-problems must be >= 1 (got {args.calibration_problems}).")
    config = ExtrapolationConfig(
        proposal=args.proposal, temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
        top_k=args.top_k, **config_overrides(args),
    )
    chosen = problems[: args.calibration_problems]
    eos = eos_token_ids(tokenizer, rl_model, base_model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    update, close = progress_bar("calibration", not args.no_progress)
    stats: dict[str, Any] = {}
    try:
        for index, start in enumerate(range(0, len(chosen), args.batch_size)):
            batch = chosen[start : start + args.batch_size]
            prompts = [build_prompt(p.problem, tokenizer, chat_template=args.chat_template) for p in batch]
            input_ids, attention_mask = encode_prompts(tokenizer, prompts, chat_template=args.chat_template,
                                                       pad_token_id=pad)
            torch.manual_seed(batch_seed(args.seed, "calibration", index))
            found = sample_statistics(
                rl_model, base_model, input_ids, attention_mask, config, criteria=args.criteria,
                max_new_tokens=args.max_new_tokens, num_samples=args.num_return_sequences, eos_token_id=eos,
                pad_token_id=pad, vocab_size=len(tokenizer),
            )
            for criterion, s in found.items():
                stats[criterion] = stats[criterion].merge(s) if criterion in stats else s
            update(start + len(batch), len(chosen))
    finally:
        close()
    thresholds = {c: {f"{r:g}": stats[c].threshold_for(r) for r in args.target_ratios} for c in args.criteria}
    for criterion, values in thresholds.items():
        logger.info("calibrated %s: %s", criterion, values)
    return thresholds


def run(args: argparse.Namespace) -> int:
    from ..analysis import CALIBRATABLE
    from ..evaluation import EvalMode

    if args.target_ratios is not None:
        bad = [c for c in args.criteria if c not in CALIBRATABLE]
        if bad:
            raise CLIError(f"--target-ratios cannot calibrate {bad}; calibratable criteria: {list(CALIBRATABLE)}.")
        wrong = [r for r in args.target_ratios if not 0.0 < r < 1.0]
        if wrong:
            raise CLIError(f"--target-ratios must lie in (0, 1), got {wrong}; e.g. 0.05 0.1 0.2.")
    if args.proposal == "rl" and 0.0 in args.gammas:
        raise CLIError("--proposal rl with gamma 0 just samples the RL model; use --gammas > 0 with --proposal rl.")
    if any(g < 0 for g in args.gammas):
        raise CLIError(f"--gammas must be >= 0, got {args.gammas}.")
    if args.calibrate_only and args.target_ratios is None:
        raise CLIError("--calibrate-only needs --target-ratios (the ratios to calibrate thresholds for).")
    if args.engine == "vllm" and args.target_ratios is not None:
        raise CLIError(
            "--target-ratios calibrates on the transformers engine (it reads every criterion's per-token statistics); "
            "run `hf-extrapolate sweep ... --target-ratios R ... --calibrate-only --output cal.jsonl` with --engine "
            "transformers, then `--thresholds-from cal.summary.json --engine vllm`."
        )
    read = _read_thresholds(args.thresholds_from, args.criteria) if args.thresholds_from is not None else None
    problems = load_problems_arg(args)
    state = process_state(args)
    if args.engine == "vllm":
        from .engines import load_vllm_engine

        engine, tokenizer = load_vllm_engine(args, state)
        rl_model = base_model = None
    else:
        engine = None
        rl_model, base_model, tokenizer = load_pair(args, state)

    extra: dict[str, Any] = {}
    if args.target_ratios is not None or args.thresholds_from is not None:
        if read is not None:
            thresholds = read
        else:
            thresholds = calibrate(args, rl_model, base_model, tokenizer, problems) if state.is_main_process else None
            if state.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                thresholds = broadcast_object_list([thresholds], from_process=0)[0]
        extra["calibrated_thresholds"] = thresholds
        if args.calibrate_only:
            if state.is_main_process:
                path = summary_path(args.output)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"output": str(args.output), "summary": [], **extra}, indent=2,
                                           sort_keys=True) + "\n", encoding="utf-8")
                sys.stdout.write(f"calibrated thresholds: {path}\n")
            return 0
        # rows are named by their target ratio (the calibrated tau is in each record's `threshold`)
        plan = {c: [(f"ratio={r}", tau) for r, tau in thresholds[c].items()] for c in args.criteria}
    else:
        plan = {c: [(None, tau) for tau in args.thresholds] for c in args.criteria}

    modes = [] if args.no_endpoints else [EvalMode.base(), EvalMode.rl()]
    for criterion, taus in plan.items():
        for label, tau in taus:
            for gamma in args.gammas:
                if gamma == 0:
                    mode = EvalMode.replace(criterion, tau, **config_overrides(args))
                else:
                    mode = EvalMode.extrapolate(criterion, tau, gamma, args.proposal, **config_overrides(args))
                if label is not None:
                    mode = dataclasses.replace(mode, name=mode.name.replace(f"@{mode.config.threshold:g}", f"@{label}"))
                modes.append(mode)
    names = [m.name for m in modes]
    if len(set(names)) != len(names):
        raise CLIError(f"Two sweep points share a name ({names}); pass distinct thresholds / gammas.")
    return run_and_report(args, rl_model, base_model, tokenizer, problems, modes, state, extra, engine=engine)


def _read_thresholds(path: str, criteria: list[str]) -> dict[str, dict[str, float]]:
    """`{criterion: {ratio: threshold}}` from a sweep summary's `calibrated_thresholds`, for `criteria`."""
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f).get("calibrated_thresholds")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise CLIError(f"--thresholds-from {path}: not a readable sweep summary ({err})") from None
    if not isinstance(found, dict):
        raise CLIError(f"--thresholds-from {path}: no calibrated_thresholds (write them with --target-ratios ... "
                       "--calibrate-only)")
    missing = [c for c in criteria if c not in found]
    if missing:
        raise CLIError(f"--thresholds-from {path}: no thresholds for {missing} (it has {sorted(found)}); calibrate "
                       "those criteria too, or sweep --criteria among them")
    return {c: {str(r): float(t) for r, t in found[c].items()} for c in criteria}
