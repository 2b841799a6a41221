"""`benchmarks/reproduce_toy.py --quick` runs end to end on the shipped pair; its statistics helpers are exact."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_toy.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_toy"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce_toy", None)


def test_quick_run_writes_report_figures_and_results(reproduce, tmp_path):
    threads = torch.get_num_threads()
    try:
        results = reproduce.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for name in ("report.md", "fig1b_histograms.png", "fig2_accuracy_vs_ratio.png", "fig4_gamma.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"part1", "part2", "part3"} == set(results)
    part2 = saved["part2"]
    assert set(part2["thresholds"]) == set(reproduce.CRITERIA_FIG2)
    modes = part2["summary"]
    assert modes["base"]["ratio"] == [0.0] and modes["rl"]["ratio"] == [1.0]
    # a calibrated gate replaces some but not all tokens on the held-out problems
    for mode, entry in modes.items():
        if entry["kind"] == "directional":
            assert 0.0 < entry["ratio"][0] < 0.6, (mode, entry["ratio"])
    part3 = saved["part3"]["summary"]
    always = next(e for e in part3.values() if e["criterion"] == "always")
    assert always["ratio"] == [pytest.approx(1.0)]
    report = (tmp_path / "report.md").read_text()
    assert "## 1." in report and "## 2." in report and "## 3." in report
    # records are resumable: a second run generates nothing new and gives the same numbers
    again = reproduce.main(["--quick", "--out", str(tmp_path), "--parts", "3"])
    assert again["part3"]["summary"] == saved["part3"]["summary"]


def test_calibration_problems_are_disjoint_from_the_held_out_set(reproduce):
    from hf_extrapolate.evaluation import load_problems
    from hf_extrapolate.toy import TOY_PAIR_DIR

    held_out = {p.problem for p in load_problems(Path(TOY_PAIR_DIR) / "held_out.jsonl")}
    calibration = reproduce.calibration_problems(64)
    assert len(calibration) == 64 and not held_out & {p.problem for p in calibration}


def test_rank_auc_matches_pairwise_count(reproduce):
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).float()
    neg = torch.randint(0, 6, (30,), generator=g).float()
    pairwise = sum(float(x > y) + 0.5 * float(x == y) for x in pos for y in neg) / (40 * 30)
    assert reproduce.rank_auc(pos, neg) == pytest.approx(pairwise, abs=1e-12)
    assert reproduce.rank_auc(neg + 10, neg) == 1.0 and reproduce.rank_auc(neg, neg) == pytest.approx(0.5)


def test_ratio_reaching_interpolates_and_reports_never(reproduce):
    points = [(0.0, 0.4), (0.1, 0.6), (0.2, 0.8), (1.0, 0.7)]
    assert reproduce.ratio_reaching(0.7, points) == pytest.approx(0.15)
    assert reproduce.ratio_reaching(0.6, points) == pytest.approx(0.1)
    assert reproduce.ratio_reaching(0.9, points) is None


def test_paired_difference_and_bootstrap_interval(reproduce):
    rng = random.Random(0)
    records = {0: [], 1: []}
    for seed in records:
        for p in range(50):
            for mode, rate in (("a", 0.7), ("b", 0.5)):
                records[seed].append({"mode": mode, "problem_id": p, "correct": rng.random() < rate})
    d = reproduce.paired_difference(records, "a", "b")
    acc = {m: reproduce.problem_accuracy(records, m) for m in "ab"}
    exact = 100 * sum(acc["a"][p] - acc["b"][p] for p in acc["a"]) / 50
    assert d["diff"] == pytest.approx(exact) and d["ci_low"] < exact < d["ci_high"]
    assert d["better"] + d["worse"] <= 50
    mean, std = reproduce.mean_std([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0) and math.isnan(reproduce.mean_std([1.0])[1])
