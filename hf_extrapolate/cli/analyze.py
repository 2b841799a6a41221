"""`hf-extrapolate analyze`: how the RL model differs from its base on text each of them generates.

Samples responses from the base and/or the RL model, computes teacher-forced token metrics (Delta log p, entropies,
KLs) under both models, and writes to `--output DIR`: `histograms.png` (+ `histograms.json`, the counts),
`metric_summary.json`, `top_tokens.json` and, with `--target-ratios`, `thresholds.json` (thresholds calibrated on the
proposal model's responses). `--save-metrics` also writes `token_metrics.pt` (every valid token's metrics). Runs in
one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import CRITERIA, PROPOSALS, ExtrapolationConfig
from . import CLIError
from .eval import add_data_arguments, add_model_arguments, add_sampling_arguments, load_pair, progress_bar

SOURCES = {"base": "base-generated", "rl": "RL-generated"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="token-level diagnostics: Δlog p / entropy / KL histograms, top tokens, threshold calibration",
        description="Sample responses from the base and RL models, compute teacher-forced token metrics under both, "
        "and write histograms (PNG + JSON), metric summaries, the most raised / lowered tokens and calibrated "
        "thresholds to --output DIR.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    group = parser.add_argument_group("analysis")
    group.add_argument("--sources", nargs="+", default=["base", "rl"], choices=tuple(SOURCES),
                       help="which models generate the analysed text (default: base rl)")
    group.add_argument("--bins", type=int, default=100, help="histogram bins (default: 100)")
    group.add_argument("--num-top-tokens", type=int, default=30, help="entries per top-token list (default: 30)")
    group.add_argument("--min-count", type=int, default=5,
                       help="ignore tokens seen fewer times in the top-token lists (default: 5)")
    group.add_argument("--criteria", nargs="+", default=["logp_diff"], choices=CRITERIA,
                       help="criteria to calibrate with --target-ratios (default: logp_diff)")
    group.add_argument("--target-ratios", nargs="+", type=float, default=None, metavar="R",
                       help="calibrate thresholds to these replacement ratios on the proposal's responses")
    group.add_argument("--proposal", default="base", choices=PROPOSALS,
                       help="proposal model for calibration; its source must be analysed (default: base)")
    group.add_argument("--save-metrics", action="store_true", help="also write token_metrics.pt")
    group.add_argument("--output", required=True, metavar="DIR", help="output directory")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_sampling_arguments(parser, max_new_tokens=512, samples_help="responses sampled per problem from each model (default: 1)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import (
        CALIBRATABLE,
        histogram_counts,
        metric_summary,
        plot_token_histograms,
        replacement_statistics,
        token_metrics,
        top_tokens,
    )
    from ..evaluation import EvalMode, build_prompt, load_datasets
    from ..evaluation.generation import encode_prompts, eos_token_ids, generate_responses
    from ..evaluation.runner import batch_seed
    from .eval import settings_from

    if args.target_ratios is not None:
        if args.proposal not in args.sources:
            raise CLIError(f"--target-ratios calibrates on the proposal's text: add {args.proposal} to --sources.")
        bad = [c for c in args.criteria if c not in CALIBRATABLE] + [r for r in args.target_ratios if not 0 < r < 1]
        if bad:
            raise CLIError(f"cannot calibrate {bad}: criteria must be in {list(CALIBRATABLE)}, ratios in (0, 1).")
    problems = load_datasets(args.data, limit=args.limit)
    rl_model, base_model, tokenizer = load_pair(args)
    settings = settings_from(args)
    config = ExtrapolationConfig(
        proposal=args.proposal, temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
        top_k=args.top_k,
    )
    eos = eos_token_ids(tokenizer, rl_model, base_model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    collected: dict[str, dict[str, list[torch.Tensor]]] = {}
    stats: dict[str, Any] = {}
    batches = [problems[i : i + args.batch_size] for i in range(0, len(problems), args.batch_size)]
    update, close = progress_bar("analyze", not args.no_progress)
    try:
        for s_index, source in enumerate(args.sources):
            mode = EvalMode.base() if source == "base" else EvalMode.rl()
            parts = collected.setdefault(SOURCES[source], {})
            for b_index, batch in enumerate(batches):
                prompts = [build_prompt(p.problem, tokenizer, chat_template=args.chat_template) for p in batch]
                input_ids, attention_mask = encode_prompts(tokenizer, prompts, chat_template=args.chat_template,
                                                           pad_token_id=pad)
                torch.manual_seed(batch_seed(args.seed, f"analyze-{source}", b_index))
                responses = generate_responses(rl_model, base_model, mode, input_ids, attention_mask, settings,
                                               eos_token_id=eos, pad_token_id=pad, vocab_size=len(tokenizer))
                full_mask = responses.attention_mask(attention_mask)
                metrics = token_metrics(rl_model, base_model, responses.sequences, full_mask, responses.prompt_length,
                                        vocab_size=len(tokenizer))
                valid = responses.response_mask.to(metrics["logp_diff"].device)
                for name, values in metrics.items():
                    parts.setdefault(name, []).append(values[valid].cpu())
                parts.setdefault("token_id", []).append(
                    responses.sequences[:, responses.prompt_length :][valid.to(responses.sequences.device)].cpu()
                )
                if args.target_ratios is not None and source == args.proposal:
                    found = replacement_statistics(rl_model, base_model, responses.sequences, full_mask,
                                                   responses.prompt_length, config, criteria=args.criteria,
                                                   vocab_size=len(tokenizer))
                    for criterion, s in found.items():
                        stats[criterion] = stats[criterion].merge(s) if criterion in stats else s
                update(s_index * len(batches) + b_index + 1, len(args.sources) * len(batches))
    finally:
        close()

    flat = {source: {name: torch.cat(values)[None] for name, values in parts.items()}
            for source, parts in collected.items()}
    metrics_only = {source: {k: v for k, v in m.items() if k != "token_id"} for source, m in flat.items()}
    written = {"histograms": str(plot_token_histograms(metrics_only, out_dir / "histograms.png", bins=args.bins))}
    files = {
        "histograms_json": ("histograms.json", histogram_counts(metrics_only, bins=args.bins)),
        "metric_summary": ("metric_summary.json", {s: metric_summary(m) for s, m in metrics_only.items()}),
        "top_tokens": ("top_tokens.json", {
            s: top_tokens(m["logp_diff"], m["token_id"], tokenizer, k=args.num_top_tokens, min_count=args.min_count)
            for s, m in flat.items()
        }),
    }
    if stats:
        files["thresholds"] = ("thresholds.json", {
            c: {f"{r:g}": stats[c].threshold_for(r) for r in args.target_ratios} for c in args.criteria
        })
    for key, (name, data) in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written[key] = str(out_dir / name)
    if args.save_metrics:
        torch.save(flat, out_dir / "token_metrics.pt")
        written["token_metrics"] = str(out_dir / "token_metrics.pt")

    report: dict[str, Any] = {"tokens": {s: int(m["logp_diff"].numel()) for s, m in flat.items()}, "files": written}
    report["mean"] = {s: {k: float(v.nanmean()) for k, v in m.items()} for s, m in metrics_only.items()}
    if stats:
        report["thresholds"] = files["thresholds"][1]
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
