"""Accuracy metrics over sampled answers: Avg@k, unbiased Pass@k, per-problem accuracy, and a summary table.

A *record* is one sampled answer as the runner writes it (`hf_extrapolate.evaluation.runner`): a dict with at least
`mode`, `dataset`, `problem_id`, `correct`, `length` and `replace_ratio`. Everything here is pure Python over records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` (={value!r}) must be an int.")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from `n` samples of which `c` are correct (Chen et al. 2021): `1 - C(n-c, k) / C(n, k)`.

    The probability that at least one of `k` samples drawn without replacement from the `n` is correct. Computed
    with exact integer binomials (correctly rounded), so it is stable for any `n`.

    >>> pass_at_k(4, 1, 2)
    0.5
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if n < 1:
        raise ValueError(f"`n` (={n}) is the number of samples and must be >= 1.")
    if not 0 <= c <= n:
        raise ValueError(f"`c` (={c}) is the number of correct samples and must lie in [0, n={n}].")
    if not 1 <= k <= n:
        raise ValueError(f"`k` (={k}) must lie in [1, n={n}]; Pass@k needs at least k samples per problem.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_ks(n: int) -> list[int]:
    """The Pass@k values reported for `n` samples per problem: 1, 2, 4, ... up to `n`, and `n` itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


RECORD_KEYS = ("mode", "dataset", "problem_id", "correct")


def group_records(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]]:
    """`{(mode, dataset): {problem_id: [records]}}`, in first-seen order."""
    groups: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = {}
    for number, record in enumerate(records, start=1):
        missing = [k for k in RECORD_KEYS if k not in record] if isinstance(record, Mapping) else list(RECORD_KEYS)
        if missing:
            raise ValueError(
                f"record {number} lacks {missing}: not a record written by `evaluate` (each has {list(RECORD_KEYS)}); "
                "pass the records of an eval/sweep run (its --output file)."
            )
        groups.setdefault((record["mode"], record["dataset"]), {}).setdefault(str(record["problem_id"]), []).append(record)
    return groups


def per_problem_accuracy(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """`{(mode, dataset): {problem_id: fraction of its samples that are correct}}`."""
    return {
        key: {pid: sum(bool(r["correct"]) for r in rs) / len(rs) for pid, rs in problems.items()}
        for key, problems in group_records(records).items()
    }


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


MODE_FIELDS = ("kind", "criterion", "threshold", "gamma", "proposal")


def summarize(records: Iterable[Mapping[str, Any]], ks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per (mode, data set): Avg@k, Pass@k, mean response length and mean replacement ratio.

    - `avg_at_k`: mean correctness over all samples of all problems (the paper's Avg@k, k = samples per problem);
    - `pass_at_k`: `{k: mean over problems of pass_at_k(n_i, c_i, k)}` for every k <= the smallest n_i (default
      `default_ks`);
    - `mean_length`: mean generated tokens (end-of-sequence included); `replace_ratio`: mean over samples of the
      expected replaced fraction (0 for the base model, 1 for the RL model).
    """
    rows = []
    for (mode, dataset), problems in group_records(records).items():
        samples = [r for rs in problems.values() for r in rs]
        counts = [(len(rs), sum(bool(r["correct"]) for r in rs)) for rs in problems.values()]
        n_min = min(n for n, _ in counts)
        wanted = default_ks(n_min) if ks is None else [k for k in ks if k <= n_min]
        first = samples[0]
        row: dict[str, Any] = {"mode": mode, "dataset": dataset}
        row.update({name: first.get(name) for name in MODE_FIELDS})
        row.update(
            problems=len(problems),
            samples_per_problem=n_min,
            avg_at_k=sum(bool(r["correct"]) for r in samples) / len(samples),
            pass_at_k={str(k): sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in wanted},
            mean_length=_mean([r.get("length") for r in samples]),
            replace_ratio=_mean([r.get("replace_ratio") for r in samples]),
        )
        rows.append(row)
    return rows


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of `summarize` rows (accuracies in percent)."""
    ks = sorted({int(k) for row in rows for k in row["pass_at_k"]})
    header = ["dataset", "mode", "problems", "k", "Avg@k"] + [f"Pass@{k}" for k in ks] + ["length", "replaced"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_dataset: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"]].append(row)
    for dataset, group in by_dataset.items():
        for row in group:
            cells = [dataset, row["mode"], str(row["problems"]), str(row["samples_per_problem"])]
            cells.append(f"{100 * row['avg_at_k']:.1f}")
            cells += [f"{100 * row['pass_at_k'][str(k)]:.1f}" if str(k) in row["pass_at_k"] else "" for k in ks]
            cells.append("" if row["mean_length"] is None else f"{row['mean_length']:.0f}")
            cells.append("" if row["replace_ratio"] is None else f"{100 * row['replace_ratio']:.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
