"""Summaries of token metrics: shared-bin histograms (and their PNG), metric statistics, and the top-token lists.

`metrics_by_source` maps a text source (e.g. `"base-generated"`, `"RL-generated"`) to the dict that
`token_metrics` returns; NaN entries (padding) are ignored everywhere. Plots import matplotlib when drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# the metrics the paper draws (Fig. 1b, 12-15), in its order
HISTOGRAM_METRICS = ("logp_diff", "base_entropy", "rl_entropy", "kl", "reverse_kl", "avg_kl")
LABELS = {
    "logp_diff": "Δ log p = log π_RL(y) − log π_base(y)",
    "rl_logprob": "log π_RL(y)",
    "base_logprob": "log π_base(y)",
    "base_entropy": "H(π_base)",
    "rl_entropy": "H(π_RL)",
    "kl": "KL(π_RL ‖ π_base)",
    "reverse_kl": "KL(π_base ‖ π_RL)",
    "avg_kl": "(KL + reverse KL) / 2",
}


def _finite(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().flatten().double().cpu()
    return values[torch.isfinite(values)]


def histogram_counts(
    metrics_by_source: Mapping[str, Mapping[str, torch.Tensor]],
    metrics: Sequence[str] = HISTOGRAM_METRICS,
    bins: int = 100,
) -> dict[str, dict[str, Any]]:
    """`{metric: {"edges": [bins + 1 floats], "counts": {source: [bins ints]}}}`, edges shared by the sources."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"`bins` (={bins!r}) must be a positive integer.")
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        values = {source: _finite(m[metric]) for source, m in metrics_by_source.items() if metric in m}
        pooled = torch.cat(list(values.values())) if values else torch.empty(0, dtype=torch.float64)
        if pooled.numel() == 0:
            continue
        lo, hi = float(pooled.min()), float(pooled.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        out[metric] = {
            "edges": edges.tolist(),
            "counts": {source: torch.histc(v, bins, lo, hi).long().tolist() for source, v in values.items()},
        }
    return out


def plot_token_histograms(
    metrics_by_source: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    metrics: Sequence[str] = HISTOGRAM_METRICS,
    bins: int = 100,
) -> Path:
    """One panel per metric, the sources overlaid, counts on a log scale (the paper's Fig. 1b); saves a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: `pip install matplotlib` (or hf_extrapolate[eval]).") from err
    hist = histogram_counts(metrics_by_source, metrics, bins)
    columns = min(3, max(1, len(hist)))
    rows = max(1, -(-len(hist) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (metric, data) in zip(axes.flat, hist.items()):
        for source, counts in data["counts"].items():
            ax.stairs(counts, data["edges"], fill=True, alpha=0.45, label=source)
        ax.set_yscale("log")
        ax.set_xlabel(LABELS.get(metric, metric))
        ax.set_ylabel("tokens")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(hist) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_summary(metrics: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per metric: count, mean, std, min, 1/50/99th percentiles and max of the non-NaN entries."""
    out = {}
    for name, values in metrics.items():
        v = _finite(values)
        if v.numel() == 0:
            out[name] = {"count": 0}
            continue
        q = torch.quantile(v, torch.tensor([0.01, 0.5, 0.99], dtype=v.dtype)).tolist() if v.numel() < 2**24 else [
            float("nan")
        ] * 3
        out[name] = {
            "count": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": float(v.min()), "p01": q[0], "p50": q[1], "p99": q[2], "max": float(v.max()),
        }
    return out


def top_tokens(
    logp_diff: torch.Tensor,
    tokens: torch.Tensor,
    tokenizer: Any = None,
    *,
    k: int = 20,
    min_count: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """The tokens the RL model raised and lowered most relative to the base (the paper's top-token lists).

    Args:
        logp_diff: (B, N) Δ log p of generated tokens (NaN on padding), `token_metrics(...)["logp_diff"]`.
        tokens: (B, N) the generated token ids, `sequences[:, prompt_length:]`.
        tokenizer (*optional*): decodes each id; without it `token` is None.
        k (`int`, defaults to 20): entries per list.
        min_count (`int`, defaults to 1): ignore tokens seen fewer times (rare tokens have noisy means).

    Returns:
        `{"raised": [...], "lowered": [...]}`, each entry `{"token_id", "token", "mean_logp_diff", "count"}`, sorted by
        mean Δ log p (highest first for `raised`, lowest first for `lowered`); `raised` holds only tokens with a
        positive mean, `lowered` only tokens with a negative one (either may have fewer than `k` entries).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` (={k!r}) must be a positive integer: the number of tokens per list.")
    if logp_diff.shape != tokens.shape:
        raise ValueError(
            f"`logp_diff` {tuple(logp_diff.shape)} and `tokens` {tuple(tokens.shape)} must have the same shape: pass "
            "sequences[:, prompt_length:] as tokens."
        )
    values = logp_diff.detach().double().cpu().flatten()
    ids = tokens.detach().long().cpu().flatten()
    keep = torch.isfinite(values)
    values, ids = values[keep], ids[keep]
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"`tokens` holds the negative id {int(ids.min())} at a position with a finite Δ log p: pass "
                         "the generated token ids, `sequences[:, prompt_length:]`.")
    # group by the distinct ids (not a bincount over [0, max id]: an id of 1e9 would allocate gigabytes)
    seen, inverse = torch.unique(ids, return_inverse=True)
    counts_all = torch.bincount(inverse, minlength=seen.numel())
    sums_all = torch.bincount(inverse, weights=values, minlength=seen.numel())
    frequent = counts_all >= max(1, min_count)
    seen, counts, sums = seen[frequent], counts_all[frequent], sums_all[frequent]
    means = sums / counts
    order = torch.argsort(means, descending=True)

    def entry(i: int) -> dict[str, Any]:
        token_id = int(seen[i])
        return {
            "token_id": token_id,
            "token": tokenizer.decode([token_id]) if tokenizer is not None else None,
            "mean_logp_diff": float(means[i]),
            "count": int(counts[i]),
        }

    # a list holds only tokens whose mean has its sign: on a small vocabulary the two would otherwise overlap
    return {
        "raised": [entry(int(i)) for i in order if means[i] > 0][:k],
        "lowered": [entry(int(i)) for i in order.flip(0) if means[i] < 0][:k],
    }
