"""The paper reproduced in miniature on the built-in toy base/RLVR pair (`hf_extrapolate.toy`).

```bash
python benchmarks/reproduce_toy.py                       # parts 1-3 (about 20 min on 2 CPU cores), report + figures
python benchmarks/reproduce_toy.py --parts 4             # part 4: Eq. 8 vs DAPO training, 3 seeds (~25 min)
python benchmarks/reproduce_toy.py --quick --out /tmp/t  # a few problems, one seed: a smoke run (seconds)
```

1. **Fig. 1b**: teacher-forced Δlogp, entropy and KL of base- and RL-generated text (temperature 1): histograms, and
   how well each metric tells the two sources apart (AUC, tail masses).
2. **Fig. 2**: selective replacement (the base model proposes, the RL model redraws where the criterion fires) for
   `logp_diff`, `avg_kl`, `entropy` and `random` at matched replacement ratios: thresholds are calibrated per
   criterion on *training-split* problems (`calibrate_threshold`, one refinement), never on the evaluation set.
3. **Fig. 4 / Table 5**: selective extrapolation (γ > 0) against the RL model and against replace-only at the same
   gate, with the base model and with the RL model as proposal, plus global extrapolation (`always`) as a control:
   Avg@k, Pass@k per seed (mean ± std over seeds) and the paired per-problem difference to the RL model with a
   bootstrap 95% confidence interval.
4. **Fig. 5**: RL training with the Eq. 8 advantage reweighting against plain DAPO from the same base model
   (`benchmarks/toy_training.py`).

Every mode samples the 200 held-out problems of the shipped pair (`held_out.jsonl`), `--samples` times per problem,
with the same seeds (`GenerationSettings.seed`: every batch is seeded from the seed and its index, identically in every
mode). Raw records go to `OUT/records/` (JSON Lines, resumable: a rerun only generates what is missing); the report
`OUT/report.md`, `OUT/results.json` and the figures to `OUT/`. Nothing here is tuned on the evaluation problems: the
gate τ = -0.3 and the γ grid are fixed in advance (the paper's values), the matched-ratio thresholds come from
training-split problems.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_extrapolate import ExtrapolationConfig
from hf_extrapolate.analysis import calibrate_threshold, plot_token_histograms, token_metrics
from hf_extrapolate.evaluation import (
    EvalMode,
    GenerationSettings,
    Problem,
    evaluate,
    generate_responses,
    load_problems,
    summarize,
)
from hf_extrapolate.evaluation.generation import encode_prompts
from hf_extrapolate.evaluation.prompts import build_prompt
from hf_extrapolate.toy import TOY_PAIR_DIR, load_toy_pair, sample_problems

GATE = -0.3  # the paper's tau for logp_diff, fixed in advance (not tuned here)
GAMMAS = (0.05, 0.1, 0.2, 0.5)
TARGET_RATIOS = (0.02, 0.05, 0.1, 0.2)
CRITERIA_FIG2 = ("logp_diff", "avg_kl", "entropy", "random")
MAX_NEW_TOKENS = 48  # the toy answers need <= 25 tokens; the build evaluates with 48 too


@dataclasses.dataclass
class Setup:
    rl: Any
    base: Any
    tokenizer: Any
    held_out: list[Problem]
    calibration: list[Problem]
    seeds: tuple[int, ...]
    samples: int
    out: Path
    batch_size: int = 50

    def settings(self, seed: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, num_samples=self.samples, seed=seed,
                                  batch_size=self.batch_size)


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def calibration_problems(n: int) -> list[Problem]:
    """Training-split toy problems (disjoint from the held-out ones by construction) as evaluation `Problem`s."""
    return [Problem("toy_calibration", f"cal-{i}", i, p.statement, str(p.answer))
            for i, p in enumerate(sample_problems(n, seed=9_999, split="train"))]


def encode(setup: Setup, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [build_prompt(p.problem, setup.tokenizer) for p in problems]
    return encode_prompts(setup.tokenizer, texts, chat_template=True, pad_token_id=setup.tokenizer.pad_token_id)


def run_modes(setup: Setup, name: str, modes: Sequence[EvalMode], problems: Sequence[Problem] | None = None
              ) -> dict[int, list[dict[str, Any]]]:
    """{seed: records} of `modes` on the held-out problems, resumable per seed."""
    out = {}
    for seed in setup.seeds:
        path = setup.out / "records" / f"{name}_seed{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        out[seed] = evaluate(setup.rl, setup.base, setup.tokenizer, problems or setup.held_out, modes,
                             setup.settings(seed), output=path)
        log(f"{name} seed {seed}: {len(modes)} modes in {time.perf_counter() - started:.0f} s")
    return out


# ---------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def per_seed_summary(records_by_seed: dict[int, list[dict]]) -> dict[str, dict[str, Any]]:
    """{mode: {"avg": [per seed], "pass": {k: [per seed]}, "ratio": [per seed], "length": [...], fields}}."""
    out: dict[str, dict[str, Any]] = {}
    for seed, records in records_by_seed.items():
        for row in summarize(records):
            entry = out.setdefault(row["mode"], {"avg": [], "pass": {}, "ratio": [], "length": [], "seeds": [],
                                                 **{k: row[k] for k in ("kind", "criterion", "threshold", "gamma",
                                                                        "proposal")}})
            entry["seeds"].append(seed)
            entry["avg"].append(row["avg_at_k"])
            entry["ratio"].append(row["replace_ratio"])
            entry["length"].append(row["mean_length"])
            for k, v in row["pass_at_k"].items():
                entry["pass"].setdefault(k, []).append(v)
    return out


def problem_accuracy(records_by_seed: dict[int, list[dict]], mode: str) -> dict[str, float]:
    """Per problem: the fraction of its samples (all seeds pooled) that are correct."""
    counts: dict[str, list[int]] = {}
    for records in records_by_seed.values():
        for r in records:
            if r["mode"] == mode:
                c = counts.setdefault(str(r["problem_id"]), [0, 0])
                c[0] += bool(r["correct"])
                c[1] += 1
    return {pid: c / n for pid, (c, n) in counts.items()}


def paired_difference(records_by_seed: dict[int, list[dict]], mode: str, reference: str, resamples: int = 4000,
                      seed: int = 0) -> dict[str, float]:
    """Mean per-problem accuracy difference `mode - reference` (points) and a bootstrap 95% CI over problems."""
    a, b = problem_accuracy(records_by_seed, mode), problem_accuracy(records_by_seed, reference)
    diffs = [a[p] - b[p] for p in a]
    rng = random.Random(seed)
    n = len(diffs)
    boots = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {"diff": 100 * sum(diffs) / n, "ci_low": 100 * boots[int(0.025 * resamples)],
            "ci_high": 100 * boots[int(0.975 * resamples) - 1], "problems": n,
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}


def fmt_ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


# ---------------------------------------------------------------------- part 1: Fig. 1b
def rank_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(X > Y) + P(X = Y) / 2 for X from `positive`, Y from `negative` (Mann-Whitney AUC)."""
    neg = negative.double().sort().values
    pos = positive.double()
    below = torch.searchsorted(neg, pos, right=False).double()
    equal = torch.searchsorted(neg, pos, right=True).double() - below
    return float((below + 0.5 * equal).mean() / len(neg))


def part1(setup: Setup) -> dict[str, Any]:
    """Token metrics of base- and RL-generated responses to the held-out prompts (temperature 1)."""
    eos = [setup.tokenizer.eos_token_id]
    ids, mask = encode(setup, setup.held_out)
    sources = {}
    for label, mode in (("base-generated", EvalMode.base()), ("RL-generated", EvalMode.rl())):
        torch.manual_seed(setup.seeds[0])
        responses = generate_responses(setup.rl, setup.base, mode, ids, mask, setup.settings(setup.seeds[0]),
                                       eos_token_id=eos, pad_token_id=setup.tokenizer.pad_token_id)
        sources[label] = token_metrics(setup.rl, setup.base, responses.sequences,
                                       responses.attention_mask(mask), responses.prompt_length)
    plot_token_histograms(sources, setup.out / "fig1b_histograms.png",
                          metrics=("logp_diff", "base_entropy", "kl"), bins=80)
    stats: dict[str, Any] = {"tokens": {}, "metrics": {}, "problems": len(setup.held_out), "samples": setup.samples}
    flat = {s: {m: v[~v.isnan()] for m, v in metrics.items()} for s, metrics in sources.items()}
    for s in flat:
        stats["tokens"][s] = int(flat[s]["logp_diff"].numel())
    for metric in ("logp_diff", "base_entropy", "rl_entropy", "kl", "avg_kl"):
        base_v, rl_v = flat["base-generated"][metric], flat["RL-generated"][metric]
        pooled = torch.cat([base_v, rl_v]).double()
        hi = float(torch.quantile(pooled, 0.95))
        entry = {
            "auc_rl_vs_base": rank_auc(rl_v, base_v),
            "mean": {"base-generated": float(base_v.mean()), "RL-generated": float(rl_v.mean())},
            "p95_pooled": hi,
            "above_p95": {s: float((flat[s][metric] > hi).double().mean()) for s in flat},
        }
        if metric == "logp_diff":
            entry["below_minus_0.3"] = {s: float((flat[s][metric] < -0.3).double().mean()) for s in flat}
            entry["above_plus_0.3"] = {s: float((flat[s][metric] > 0.3).double().mean()) for s in flat}
            entry["within_0.05"] = {s: float((flat[s][metric].abs() < 0.05).double().mean()) for s in flat}
        stats["metrics"][metric] = entry
    return stats


def report_part1(stats: dict[str, Any]) -> list[str]:
    lines = ["## 1. Δlogp separates base- from RL-generated text; entropy and KL barely do (Fig. 1b)", "",
             f"Teacher-forced metrics of {stats['tokens']['base-generated']} base-generated and "
             f"{stats['tokens']['RL-generated']} RL-generated tokens ({stats['problems']} held-out prompts × "
             f"{stats['samples']} samples, T = 1). "
             "AUC: the probability that a random RL-generated token has a higher value than a random base-generated "
             "one (0.5 = the metric cannot tell the sources apart). Tail: share of tokens above the pooled 95th "
             "percentile.", "", "![Fig. 1b](fig1b_histograms.png)", "",
             "| metric | AUC (RL vs base) | mean, base text | mean, RL text | tail, base text | tail, RL text |",
             "|---|---|---|---|---|---|"]
    for metric in ("logp_diff", "base_entropy", "rl_entropy", "kl", "avg_kl"):
        e = stats["metrics"][metric]
        lines.append(f"| {metric} | {e['auc_rl_vs_base']:.3f} | {e['mean']['base-generated']:.3f} | "
                     f"{e['mean']['RL-generated']:.3f} | {100 * e['above_p95']['base-generated']:.1f}% | "
                     f"{100 * e['above_p95']['RL-generated']:.1f}% |")
    d = stats["metrics"]["logp_diff"]
    lines += ["", f"Δlogp < -0.3: {100 * d['below_minus_0.3']['base-generated']:.1f}% of base-generated tokens, "
              f"{100 * d['below_minus_0.3']['RL-generated']:.1f}% of RL-generated ones; Δlogp > +0.3: "
              f"{100 * d['above_plus_0.3']['base-generated']:.1f}% and {100 * d['above_plus_0.3']['RL-generated']:.1f}%; "
              f"|Δlogp| < 0.05 (the two models agree): {100 * d['within_0.05']['base-generated']:.1f}% and "
              f"{100 * d['within_0.05']['RL-generated']:.1f}%.",
              ""]
    return lines


# ---------------------------------------------------------------------- part 2: Fig. 2
def part2(setup: Setup, ratios: Sequence[float]) -> dict[str, Any]:
    ids, mask = encode(setup, setup.calibration)
    thresholds: dict[str, dict[str, float]] = {}
    for criterion in CRITERIA_FIG2:
        for ratio in ratios:
            if criterion == "random":  # fires with probability tau: nothing to calibrate
                thresholds.setdefault(criterion, {})[str(ratio)] = float(ratio)
                continue
            cal = calibrate_threshold(setup.rl, setup.base, ids, mask, ratio, ExtrapolationConfig(criterion=criterion),
                                      max_new_tokens=MAX_NEW_TOKENS, num_samples=4, refine_steps=1, seed=1234,
                                      eos_token_id=setup.tokenizer.eos_token_id,
                                      pad_token_id=setup.tokenizer.pad_token_id)
            thresholds.setdefault(criterion, {})[str(ratio)] = cal.threshold
            log(f"calibrated {criterion} to {ratio:.0%}: tau = {cal.threshold:.4g} (ratio {cal.ratio:.3f})")
    modes = [EvalMode.base(), EvalMode.rl()] + [
        EvalMode.replace(criterion, tau) for criterion, by_ratio in thresholds.items() for tau in by_ratio.values()
    ]
    records = run_modes(setup, "fig2", modes)
    summary = per_seed_summary(records)
    rl_acc = mean_std(summary["rl"]["avg"])[0]
    reach = {}
    for criterion in CRITERIA_FIG2:
        points = sorted((mean_std(e["ratio"])[0], mean_std(e["avg"])[0]) for e in summary.values()
                        if e["criterion"] == criterion)
        base_point = (0.0, mean_std(summary["base"]["avg"])[0])
        reach[criterion] = ratio_reaching(rl_acc, [base_point, *points])  # None: not within the measured ratios
    plot_fig2(summary, setup.out / "fig2_accuracy_vs_ratio.png")
    return {"thresholds": thresholds, "summary": summary, "ratio_reaching_rl": reach, "ratios": list(ratios),
            "problems": len(setup.held_out), "calibration_problems": len(setup.calibration)}


def ratio_reaching(target: float, points: Sequence[tuple[float, float]]) -> float | None:
    """The smallest replacement ratio where the piecewise-linear accuracy curve reaches `target` (None: never)."""
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 >= target:
            return r1 if a1 == a0 or a0 >= target else r0 + (target - a0) * (r1 - r0) / (a1 - a0)
    return None


def new_axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4.2))


def accuracy_line(ax: Any, entries: Sequence[dict[str, Any]], x: str, **style: Any) -> None:
    """Mean Avg@k over seeds against `x` ("ratio" in %, or "gamma"), with the std over seeds as error bars."""
    xs = [100 * mean_std(e["ratio"])[0] if x == "ratio" else e[x] for e in entries]
    ys = [100 * mean_std(e["avg"])[0] for e in entries]
    errs = [100 * (mean_std(e["avg"])[1] if len(e["avg"]) > 1 else 0.0) for e in entries]
    ax.errorbar(xs, ys, yerr=errs, capsize=3, **style)


def finish(fig: Any, ax: Any, summary: dict[str, dict[str, Any]], xlabel: str, path: Path,
           references: Sequence[str] = ("base", "rl")) -> None:
    """The `references` models as horizontal lines, labels, grid, legend; save and close."""
    import matplotlib.pyplot as plt

    for mode, style in (("base", ":"), ("rl", "--")):
        if mode not in references:
            continue
        ax.axhline(100 * mean_std(summary[mode]["avg"])[0], color="black", linestyle=style,
                   label="base model" if mode == "base" else "RL model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Avg@k (%), held-out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig2(summary: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = new_axes()
    for criterion in CRITERIA_FIG2:
        entries = sorted((e for e in summary.values() if e["criterion"] == criterion),
                         key=lambda e: mean_std(e["ratio"])[0])
        accuracy_line(ax, entries, "ratio", marker="o", label=criterion)
    ax.set_xscale("log")
    ticks = [2, 5, 10, 20]
    ax.set_xticks(ticks, [f"{t}" for t in ticks])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    finish(fig, ax, summary, "replacement ratio (%), base model proposes", path)


def report_part2(result: dict[str, Any], seeds: Sequence[int], samples: int) -> list[str]:
    s = result["summary"]
    lines = ["## 2. Selective replacement at matched ratios (Fig. 2)", "",
             f"The base model proposes every token; where the criterion fires the RL model redraws it. Thresholds are "
             f"calibrated per criterion on {result['calibration_problems']} training-split problems to replace "
             f"{', '.join(f'{r:.0%}' for r in result['ratios'])} of the tokens; the ratio shown is the one measured on "
             f"the held-out run. Avg@{samples} on {result['problems']} held-out problems, mean ± std over seeds "
             f"{list(seeds)}.", "", "![Fig. 2](fig2_accuracy_vs_ratio.png)", "",
             "| criterion | τ | replaced | Avg@k | Pass@k (k = samples) |", "|---|---|---|---|---|"]
    k = str(samples)
    for name in ("base", "rl"):
        e = s[name]
        lines.append(f"| {'base' if name == 'base' else 'RL'} model | - | {fmt_ms(e['ratio'])}% | {fmt_ms(e['avg'])} | {fmt_ms(e['pass'][k])} |")
    for criterion in CRITERIA_FIG2:
        for e in sorted((e for e in s.values() if e["criterion"] == criterion), key=lambda e: e["threshold"]):
            lines.append(f"| {criterion} | {e['threshold']:.4g} | {fmt_ms(e['ratio'])}% | {fmt_ms(e['avg'])} | "
                         f"{fmt_ms(e['pass'][k])} |")
    lines += ["", "Replacement ratio at which each criterion's accuracy curve (linear between the base model at 0% and "
              "the measured points) first reaches the RL model's mean Avg@k:", ""]
    for criterion, r in result["ratio_reaching_rl"].items():
        largest = max(mean_std(e["ratio"])[0] for e in s.values() if e["criterion"] == criterion)
        lines.append(f"- `{criterion}`: " + (f"not reached up to {100 * largest:.1f}% replaced" if r is None
                                             else f"{100 * r:.1f}%"))
    return lines + [""]


# ---------------------------------------------------------------------- part 3: Fig. 4 / Table 5
def part3_modes(gammas: Sequence[float]) -> list[EvalMode]:
    modes = [EvalMode.base(), EvalMode.rl(), EvalMode.replace("logp_diff", GATE)]
    modes += [EvalMode.extrapolate("logp_diff", GATE, g, proposal="base") for g in gammas]
    # gamma = 0 with the RL model proposing is not the RL model: a token with Delta logp < tau is redrawn once
    rl_gate = ExtrapolationConfig(proposal="rl", criterion="logp_diff", threshold=GATE, gamma=0.0)
    modes.append(EvalMode(f"replace:logp_diff@{GATE:g},proposal=rl", "directional", rl_gate))
    modes += [EvalMode.extrapolate("logp_diff", GATE, g, proposal="rl") for g in gammas]
    cfg = ExtrapolationConfig(proposal="rl", criterion="always", gamma=0.1)
    modes.append(EvalMode("extrapolate:always,gamma=0.1,proposal=rl", "directional", cfg))
    return modes


def part3(setup: Setup, gammas: Sequence[float]) -> dict[str, Any]:
    records = run_modes(setup, "fig4", part3_modes(gammas))
    summary = per_seed_summary(records)
    paired = {mode: paired_difference(records, mode, "rl") for mode in summary if mode != "rl"}
    replace = EvalMode.replace("logp_diff", GATE).name
    rl_replace = f"replace:logp_diff@{GATE:g},proposal=rl"
    paired_vs_replace = {m: paired_difference(records, m, replace if summary[m]["proposal"] == "base" else rl_replace)
                         for m in summary if summary[m]["gamma"] and summary[m]["criterion"] == "logp_diff"}
    plot_fig4(summary, setup.out / "fig4_gamma.png")
    return {"summary": summary, "vs_rl": paired, "vs_replace": paired_vs_replace, "gammas": list(gammas),
            "problems": len(setup.held_out)}


def plot_fig4(summary: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = new_axes()
    for proposal, marker in (("base", "o"), ("rl", "s")):
        entries = [e for e in summary.values() if e["kind"] == "directional" and e["proposal"] == proposal
                   and e["criterion"] == "logp_diff"]
        entries.sort(key=lambda e: e["gamma"])
        accuracy_line(ax, entries, "gamma", marker=marker, label=f"{proposal} model proposes, gate Δlogp < {GATE}")
    finish(fig, ax, summary, "γ (0 = replacement by the RL model)", path, references=("rl",))


def report_part3(result: dict[str, Any], seeds: Sequence[int], samples: int) -> list[str]:
    s = result["summary"]
    ks = sorted(next(iter(s.values()))["pass"], key=int)
    lines = ["## 3. Selective extrapolation against the RL model (Fig. 4, Table 5)", "",
             f"Gate Δlogp < {GATE} (fixed in advance), γ grid {result['gammas']}. Avg@{samples} and Pass@k per seed, "
             f"mean ± std over seeds {list(seeds)}; Δ vs RL: mean per-problem accuracy difference to the RL model "
             f"(all {len(seeds) * samples} samples of a problem pooled) with a bootstrap 95% CI over the "
             f"{result['problems']} problems.",
             "", "![Fig. 4](fig4_gamma.png)", "",
             "| mode | proposal | γ | replaced | Avg@k | " + " | ".join(f"Pass@{k}" for k in ks)
             + " | Δ vs RL (95% CI) | length |",
             "|---|---|---|---|---|" + "---|" * len(ks) + "---|---|"]
    for mode, e in s.items():
        d = result["vs_rl"].get(mode)
        delta = "-" if d is None else f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        if e["kind"] != "directional":
            name = f"{e['kind']} model" if e["kind"] == "base" else "RL model"
        else:
            name = e["criterion"] + ("" if e["gamma"] else " (replace)")
        lines.append(f"| {name} | {e['proposal'] or '-'} | {e['gamma'] if e['gamma'] is not None else '-'} | "
                     f"{fmt_ms(e['ratio'])}% | {fmt_ms(e['avg'])} | "
                     + " | ".join(fmt_ms(e["pass"][k]) for k in ks) + f" | {delta} | {fmt_ms(e['length'], 1, 1)} |")
    lines += ["", "Extrapolation (γ > 0) against replace-only (γ = 0) at the same gate and proposal, paired per "
              "problem (95% CI):", ""]
    for mode, d in result["vs_replace"].items():
        lines.append(f"- {s[mode]['proposal']} model proposes, γ = {s[mode]['gamma']}: {d['diff']:+.1f} points "
                     f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]")
    return lines + [""]


# ---------------------------------------------------------------------- part 4: Fig. 5
def part4(out: Path, seeds: Sequence[int], steps: int, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import toy_training

    results = toy_training.run_training_comparison(out, seeds=tuple(seeds), steps=steps, threads=threads)
    toy_training.plot_training_curves(results, out / "fig5_training_curves.png")
    return {"results": results, "summary_markdown": toy_training.summarize_training(results)}


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/toy", help="report, figures and records go here")
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=(1, 2, 3, 4))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4, help="samples per problem and seed (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--pair", default=None, help="a pair built by `hf-extrapolate toy-pair` (default: shipped)")
    parser.add_argument("--training-steps", type=int, default=250, help="part 4: RL steps per run (default: 250)")
    parser.add_argument("--quick", action="store_true", help="8 problems, one seed, 2 samples, 2 ratios (smoke)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rl, base, tokenizer = load_toy_pair(args.pair)
    held_out = load_problems(os.path.join(args.pair or TOY_PAIR_DIR, "held_out.jsonl"))
    seeds, samples, ratios, gammas = tuple(args.seeds), args.samples, TARGET_RATIOS, GAMMAS
    calibration = calibration_problems(64)
    if args.quick:
        held_out, calibration, seeds, samples, ratios, gammas = held_out[:8], calibration[:8], seeds[:1], 2, (0.1,), (0.1,)
    setup = Setup(rl, base, tokenizer, held_out, calibration, seeds, samples, out)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    sections: list[str] = []
    started = time.perf_counter()
    for part in sorted(args.parts):
        log(f"part {part}")
        if part == 1:
            results["part1"] = part1(setup)
        elif part == 2:
            results["part2"] = part2(setup, ratios)
        elif part == 3:
            results["part3"] = part3(setup, gammas)
        else:
            results["part4"] = part4(out, seeds, args.training_steps, args.threads)
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if "part1" in results:
        sections += report_part1(results["part1"])
    if "part2" in results:
        sections += report_part2(results["part2"], seeds, samples)
    if "part3" in results:
        sections += report_part3(results["part3"], seeds, samples)
    if "part4" in results:
        sections += ["## 4. Eq. 8 reweighting against plain DAPO (Fig. 5)", "",
                     "![Fig. 5](fig5_training_curves.png)", "", results["part4"]["summary_markdown"], ""]
    header = ["# The paper in miniature, on the built-in toy pair", "",
              f"Generated by `python benchmarks/reproduce_toy.py` (last run: `--parts {' '.join(map(str, args.parts))}`"
              f"{' --quick' if args.quick else ''}, {time.perf_counter() - started:.0f} s) on {time.strftime('%Y-%m-%d')}, "
              f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s). Pair: "
              f"{args.pair or 'the shipped one'}. Parts run earlier into the same folder are kept (`results.json`).",
              ""]
    (out / "report.md").write_text("\n".join(header + sections))
    log(f"wrote {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
