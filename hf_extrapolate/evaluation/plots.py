"""Figures of an evaluation run (matplotlib, imported when a figure is drawn; PNG files).

- `plot_accuracy_vs_ratio`: the paper's Fig. 2, Avg@k against the replacement ratio, one line per criterion, with the
  base model (ratio 0) and the RL model (ratio 1) as reference lines; one panel per data set.
- `plot_problem_heatmap`: per-problem accuracy, problems down, modes across.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .metrics import per_problem_accuracy


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: `pip install matplotlib` (or hf_extrapolate[eval]).") from err
    return plt


def plot_accuracy_vs_ratio(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, metric: str = "avg_at_k"
) -> Path:
    """Accuracy against replacement ratio per criterion from `summarize` rows; saves a PNG at `path`.

    Directional modes are grouped by `(criterion, gamma, proposal)`, each a line through its points in order of ratio;
    replacement lines (gamma 0, base proposal) run from the base model (ratio 0) to the RL model (ratio 1) when those
    were evaluated, as in the paper's figure.
    """
    plt = _pyplot()
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        group = [row for row in rows if row["dataset"] == dataset]
        base = next((r for r in group if r["kind"] == "base"), None)
        rl = next((r for r in group if r["kind"] == "rl"), None)
        lines: dict[str, list[Mapping[str, Any]]] = {}
        for row in group:
            if row["kind"] == "directional":
                label = row["criterion"] + (f", γ={row['gamma']:g}" if row["gamma"] else "")
                label += f", {row['proposal']} proposal" if row["proposal"] != "base" else ""
                lines.setdefault(label, []).append(row)
        for label, points in lines.items():
            points = sorted(points, key=lambda r: r["replace_ratio"] or 0.0)
            replacement = not points[0]["gamma"] and points[0]["proposal"] == "base"  # runs from base to RL
            ends = [p for p in (base, *points, rl) if p is not None] if replacement else points
            ax.plot([100 * (p["replace_ratio"] or 0.0) for p in ends], [100 * p[metric] for p in ends],
                    marker="o", label=label)
        for row, name, marker in ((base, "base", "s"), (rl, "RL", "D")):
            if row is not None:
                ax.plot([100 * row["replace_ratio"]], [100 * row[metric]], marker=marker, color="black",
                        linestyle="none", label=f"{name} ({row['mode']})")
        ax.set_xlim(-3, 103)
        top = max((100 * r[metric] for r in group if r.get(metric) is not None), default=0.0)
        ax.set_ylim(0, min(103, max(5.0, 1.08 * top)))  # accuracies are >= 0: no negative axis when all are 0
        ax.set_title(dataset)
        ax.set_xlabel("replacement ratio (%)")
        ax.set_ylabel("Avg@k (%)" if metric == "avg_at_k" else metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_problem_heatmap(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Per-problem accuracy (modes down, problems of all data sets across); saves a PNG at `path`."""
    plt = _pyplot()
    accuracy = per_problem_accuracy(records)
    modes = list(dict.fromkeys(mode for mode, _ in accuracy))
    problems = list(dict.fromkeys((dataset, pid) for (_, dataset), acc in accuracy.items() for pid in acc))
    grid = [[accuracy.get((mode, dataset), {}).get(pid, float("nan")) for dataset, pid in problems] for mode in modes]
    label_width = 0.07 * max(len(mode) for mode in modes)
    width = min(40.0, 2.5 + label_width + 0.18 * len(problems))
    fig, ax = plt.subplots(figsize=(max(6.0, width), 1.6 + 0.4 * len(modes)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(modes)), modes, fontsize="small")
    if len(problems) <= 80:
        ax.set_xticks(range(len(problems)), [pid for _, pid in problems], rotation=90, fontsize="x-small")
    else:
        ax.set_xlabel(f"problem ({len(problems)})")
    fig.colorbar(image, ax=ax, label="accuracy", fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
