"""The paper's Fig. 5 in miniature: RLVR with the Eq. 8 advantage reweighting against plain DAPO, on the toy task.

```bash
python benchmarks/toy_training.py --out benchmarks/results/toy                      # 3 seeds x 2 methods, ~25 min
python benchmarks/toy_training.py --out /tmp/toy --seeds 0 --steps 20 --eval-every 10  # a minute
```

Every run starts from the same model, the shipped toy base (`load_toy_pair()`), and runs `hf_extrapolate.toy.train`'s
`train_rl` with `ToyPairConfig(seed=seed, rl_steps=steps)` (the settings that built the shipped RL model; the seed
picks the RL prompt set and the sampling), once per method:

- `dapo`: plain DAPO, TRL's `GRPOTrainer` (`advantage_reweighting="none"`); seed 0 reproduces the shipped RL model;
- `lowprob`: the same with the paper's Eq. 8, every token's advantage scaled by `1 + alpha (1 - p_old)`
  (`hf_extrapolate.training.DirectionalGRPOTrainer`, `advantage_reweighting="lowprob"`).

Recorded per run: TRL's per-10-step training reward, entropy and mean completion length (its log history), and the
held-out accuracy (greedy, and sampled at temperature 1, `evaluate_toy_model` on `held_out_problems` exactly as the
build evaluates) at step 0 and every `eval_every` steps. The evaluation runs inside training in a forked torch RNG,
so it does not change the training run. `out_dir/training_curves.json` is rewritten after every run; a second call
with the same settings skips the (seed, method) runs already there, so an interrupted comparison resumes.
`out_dir/training_curves.png` draws the four panels of Fig. 5 and `out_dir/training_summary.md` holds the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from hf_extrapolate.toy import ToyPairConfig, evaluate_toy_model, held_out_problems, load_toy_pair
from hf_extrapolate.toy.train import train_rl

METHODS = {"dapo": "none", "lowprob": "lowprob"}  # name in the results -> `advantage_reweighting` of `train_rl`
LABELS = {"dapo": "DAPO", "lowprob": "DAPO + Eq. 8"}
COLORS = {"dapo": "tab:blue", "lowprob": "tab:red"}
CURVES = {"reward": "reward", "entropy": "entropy", "mean_length": "completions/mean_length"}  # ours -> TRL's key
JSON_NAME, PNG_NAME, SUMMARY_NAME = "training_curves.json", "training_curves.png", "training_summary.md"

ProgressFn = Callable[[str], None]


# ---------------------------------------------------------------------- one run
def held_out_accuracy(model, tokenizer, problems, config: ToyPairConfig) -> dict[str, float]:
    """`evaluate_toy_model` as the build calls it, without disturbing a training run in progress.

    The torch RNG is forked (training sampling continues as if nothing happened) and the model's train mode and
    `use_cache` flag are restored.
    """
    was_training, use_cache = model.training, model.config.use_cache
    model.config.use_cache = True
    try:
        with torch.random.fork_rng(devices=[]):
            return evaluate_toy_model(
                model, tokenizer, problems, config.eval_samples, config.eval_seed, config.max_completion_length
            )
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


class HeldOutEvalCallback(TrainerCallback):
    """Evaluates held-out accuracy every `every` optimizer steps and at the last step, appending to `points`."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], every: int, points: list[dict[str, Any]]):
        self.evaluate, self.every, self.points = evaluate, every, points
        self.seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            t0 = time.perf_counter()
            self.points.append({"step": state.global_step, **self.evaluate()})
            self.seconds += time.perf_counter() - t0


def training_curves(log_history: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Step, reward, entropy and mean completion length of every TRL log entry that has a reward."""
    entries = [e for e in log_history if e.get("reward") is not None]
    curves = {"step": [e["step"] for e in entries]}
    for name, key in CURVES.items():
        curves[name] = [e.get(key) for e in entries]
    return curves


def run_one(seed: int, method: str, steps: int, eval_every: int, alpha: float, config: ToyPairConfig) -> dict:
    """Train a fresh copy of the shipped base with `method` and return its record (curves, evaluations, seconds)."""
    _, model, tokenizer = load_toy_pair()
    problems = held_out_problems(config)
    points: list[dict[str, Any]] = []
    evaluate = lambda: held_out_accuracy(model, tokenizer, problems, config)  # noqa: E731
    callback = HeldOutEvalCallback(evaluate, eval_every, points)
    reweighting = METHODS[method]
    t0 = time.perf_counter()
    points.append({"step": 0, **evaluate()})
    torch.manual_seed(config.seed)  # as `build_toy_pair` does before `train_rl`
    log_history = train_rl(
        model,
        tokenizer,
        config,
        advantage_reweighting=reweighting,
        reweight_alpha=alpha if reweighting != "none" else None,
        callbacks=[callback],
    )
    seconds = time.perf_counter() - t0
    return {
        "seed": seed,
        "method": method,
        "advantage_reweighting": reweighting,
        "alpha": alpha if reweighting != "none" else None,
        "eval": points,
        "train": training_curves(log_history),
        "seconds": {"total": round(seconds, 1), "eval": round(callback.seconds, 1)},
        "threads": torch.get_num_threads(),
        "log_history": log_history,
    }


# ---------------------------------------------------------------------- the comparison
def _meta(threads: int) -> dict[str, Any]:
    import trl

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # the box may be shared: timings are rough
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _load(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results already in `path`, or None; raises when they were made with other settings."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if results.get("settings") != settings:
        raise ValueError(
            f"{path} holds runs made with other settings ({results.get('settings')}, now {settings}); pass another "
            "`out_dir` or delete the file."
        )
    return results


def _write(path: str, results: dict[str, Any]) -> None:
    """Write `results` atomically (a killed run never leaves a half-written file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_training_comparison(
    out_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 250,
    eval_every: int = 50,
    alpha: float = 0.2,
    threads: int = 1,
    progress: ProgressFn | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train DAPO and DAPO + Eq. 8 from the shipped toy base for every seed; return and save the curves.

    Args:
        out_dir: where `training_curves.json` is written (after every run) and read back to resume.
        seeds: RL seeds; each seed runs both methods.
        steps: optimizer steps per run (`ToyPairConfig.rl_steps`).
        eval_every: held-out accuracy every this many steps (and at step 0 and the last step).
        alpha: the Eq. 8 strength.
        threads: torch CPU threads during the runs (restored after).
        progress: called with a one-line status message before and after every run.
        config_overrides: other `ToyPairConfig` fields (e.g. a smaller rollout for a smoke test).

    Returns `{"settings", "meta", "runs"}`, `runs` a list of per-(seed, method) records.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), JSON_NAME)
    overrides = dict(config_overrides or {})
    settings = {"steps": steps, "eval_every": eval_every, "alpha": alpha, "config_overrides": overrides}
    results = _load(path, settings) or {"settings": settings, "meta": _meta(threads), "runs": []}
    done = {(r["seed"], r["method"]) for r in results["runs"]}
    report = progress or (lambda message: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in seeds:
            for method in METHODS:
                if (seed, method) in done:
                    report(f"seed {seed} {method}: already in {path}, skipped")
                    continue
                config = ToyPairConfig(seed=seed, rl_steps=steps, num_threads=threads, **overrides)
                report(f"seed {seed} {method}: training {steps} steps ...")
                run = run_one(seed, method, steps, eval_every, alpha, config)
                results["runs"].append(run)
                _write(path, results)
                final = run["eval"][-1]
                report(
                    f"seed {seed} {method}: {run['seconds']['total']:.0f} s, held-out greedy {final['greedy']:.3f} "
                    f"sampled {final['sampled']:.3f}"
                )
    finally:
        torch.set_num_threads(previous_threads)
    return results


# ---------------------------------------------------------------------- plot
def _runs_of(results: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["seed"])


def _series(run: dict[str, Any], panel: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one run for a panel: "sampled" (held-out) or a training curve name."""
    if panel == "sampled":
        return [p["step"] for p in run["eval"]], [p["sampled"] for p in run["eval"]]
    pairs = [(s, v) for s, v in zip(run["train"]["step"], run["train"][panel]) if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _draw_panel(ax, results: dict[str, Any], panel: str, title: str) -> None:
    """Per-seed thin lines and the mean over seeds (on the steps all seeds share), one colour per method."""
    for method in METHODS:
        series = [_series(run, panel) for run in _runs_of(results, method)]
        if not series:
            continue
        for steps, values in series:
            ax.plot(steps, values, color=COLORS[method], alpha=0.3, linewidth=0.8)
        common = min(len(steps) for steps, _ in series)
        mean = [statistics.fmean(values[i] for _, values in series) for i in range(common)]
        label = f"{LABELS[method]} (mean of {len(series)})"
        ax.plot(series[0][0][:common], mean, color=COLORS[method], linewidth=2, label=label)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)


def plot_training_curves(results: dict[str, Any], path_png: str | os.PathLike) -> None:
    """Four panels like the paper's Fig. 5: held-out sampled accuracy, training reward, entropy, response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "sampled": "held-out accuracy (sampled, T=1)",
        "reward": "training reward",
        "entropy": "entropy (per token)",
        "mean_length": "response length (tokens)",
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (panel, title) in zip(axes, panels.items()):
        _draw_panel(ax, results, panel, title)
    axes[0].legend(fontsize=8)
    settings = results["settings"]
    fig.suptitle(
        f"Toy RLVR from the shipped base: DAPO vs DAPO + Eq. 8 (alpha={settings['alpha']}), "
        f"thin lines: seeds, thick: mean",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- summary
def _mean_std(values: Sequence[float]) -> str:
    std = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"
    return f"{statistics.fmean(values):.3f} ± {std}"


def _per_seed(values: Sequence[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _final(run: dict[str, Any], name: str) -> float:
    """Final held-out accuracy ("greedy"/"sampled") or last logged training value ("entropy"/"mean_length")."""
    if name in ("greedy", "sampled"):
        return run["eval"][-1][name]
    return [v for v in run["train"][name] if v is not None][-1]


def _method_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| method | seeds | step-0 greedy | final greedy (per seed) | final sampled (per seed) | final entropy | "
        "final length |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = _runs_of(results, method)
        if not runs:
            continue
        step0 = _mean_std([r["eval"][0]["greedy"] for r in runs])
        cells = [LABELS[method], _per_seed([r["seed"] for r in runs], 0), step0]
        for name in ("greedy", "sampled"):
            values = [_final(r, name) for r in runs]
            cells.append(f"{_mean_std(values)} ({_per_seed(values)})")
        for name in ("entropy", "mean_length"):
            cells.append(_mean_std([_final(r, name) for r in runs]))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _difference_rows(results: dict[str, Any]) -> list[str]:
    """Eq. 8 − DAPO, paired by seed, on the seeds both methods have."""
    dapo = {r["seed"]: r for r in _runs_of(results, "dapo")}
    eq8 = {r["seed"]: r for r in _runs_of(results, "lowprob")}
    seeds = sorted(set(dapo) & set(eq8))
    if not seeds:
        return []
    rows = [
        "",
        f"Eq. 8 − DAPO, paired by seed (seeds {_per_seed(seeds, 0)}):",
        "",
        "| quantity | mean ± std over seeds | per seed |",
        "|---|---|---|",
    ]
    names = {"greedy": "final held-out greedy", "sampled": "final held-out sampled", "entropy": "final entropy",
             "mean_length": "final length"}  # fmt: skip
    for name, title in names.items():
        diffs = [_final(eq8[s], name) - _final(dapo[s], name) for s in seeds]
        rows.append(f"| {title} | {_mean_std(diffs)} | {_per_seed(diffs)} |")
    return rows


def summarize_training(results: dict[str, Any]) -> str:
    """A markdown table: final held-out accuracy, entropy and length per method, and Eq. 8 − DAPO per seed."""
    settings = results["settings"]
    runs = results["runs"]
    config = ToyPairConfig(**settings["config_overrides"])
    header = [
        f"Toy RLVR, {settings['steps']} steps from the shipped base, Eq. 8 alpha={settings['alpha']}; held-out: "
        f"{config.eval_problems} problems, greedy and {config.eval_samples} samples at T=1 each. Final entropy and "
        "length: TRL's means over the last 10 training steps. ± is the std over seeds.",
        "",
    ]
    body = _method_rows(results) + _difference_rows(results)
    minutes = sum(r["seconds"]["total"] for r in runs) / 60
    footer = ["", f"{len(runs)} runs, {minutes:.1f} min of training in all ({results['meta']['threads']} thread(s))."]
    return "\n".join(header + body + footer)


# ---------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/toy", help="output folder (resumes from its JSON)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per run in the log
    start = time.perf_counter()
    results = run_training_comparison(
        args.out, args.seeds, args.steps, args.eval_every, args.alpha, args.threads,
        progress=lambda message: print(message, flush=True),
    )  # fmt: skip
    plot_training_curves(results, os.path.join(args.out, PNG_NAME))
    summary = summarize_training(results)
    with open(os.path.join(args.out, SUMMARY_NAME), "w", encoding="utf-8") as f:
        f.write(summary + "\n")
    print(summary)
    print(f"\nwall time of this call: {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
