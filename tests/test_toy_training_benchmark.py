"""`benchmarks/toy_training.py` (Fig. 5 in miniature) on a tiny rollout: structure, resumability, plot and summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from hf_extrapolate.toy import TOY_PAIR_DIR, ToyPairConfig
from hf_extrapolate.toy.train import train_rl

pytest.importorskip("trl")
pytest.importorskip("matplotlib")
if not os.path.isfile(os.path.join(TOY_PAIR_DIR, "base", "config.json")):
    pytest.skip("toy assets not installed", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_training.py"
TINY = dict(rl_prompts_per_generation=2, rl_num_generations=2, eval_problems=4, eval_samples=1)
STEPS, EVAL_EVERY = 10, 5  # TRL logs every 10 steps: one log entry with the training curves


def _load_module():
    spec = importlib.util.spec_from_file_location("toy_training_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_module()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_training")
    results = bench.run_training_comparison(
        out, seeds=(0,), steps=STEPS, eval_every=EVAL_EVERY, threads=1, config_overrides=TINY
    )
    return out, results


def _compare(bench, out, **changes):
    kwargs = dict(seeds=(0,), steps=STEPS, eval_every=EVAL_EVERY, threads=1, config_overrides=TINY)
    return bench.run_training_comparison(out, **{**kwargs, **changes})


def test_results_have_curves_and_evaluations_of_both_methods(run):
    out, results = run
    assert json.loads((out / "training_curves.json").read_text()) == results
    assert results["settings"] == {"steps": STEPS, "eval_every": EVAL_EVERY, "alpha": 0.2, "config_overrides": TINY}
    assert results["meta"]["threads"] == 1
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"dapo", "lowprob"} and all(r["seed"] == 0 for r in runs.values())
    for r in runs.values():
        assert [p["step"] for p in r["eval"]] == [0, 5, 10]
        assert all(0 <= p[k] <= 1 for p in r["eval"] for k in ("greedy", "sampled"))
        assert r["train"]["step"] == [10]
        for name in ("reward", "entropy", "mean_length"):
            assert len(r["train"][name]) == 1 and math.isfinite(r["train"][name][0]), name
        assert r["seconds"]["total"] > 0
    assert runs["dapo"]["eval"][0] == runs["lowprob"]["eval"][0]  # both start from the shipped base


def test_lowprob_run_used_the_directional_trainer(run):
    _, results = run
    runs = {r["method"]: r for r in results["runs"]}
    assert (runs["lowprob"]["advantage_reweighting"], runs["lowprob"]["alpha"]) == ("lowprob", 0.2)
    (logged,) = [e for e in runs["lowprob"]["log_history"] if "reward" in e]
    assert logged["reweight/weight_mean"] >= 1.0 and logged["reweight/weight_max"] <= 1.2  # 1 + 0.2 (1 - p)
    assert not any(k.startswith("reweight/") for e in runs["dapo"]["log_history"] for k in e)


def test_second_call_resumes_without_training(bench, run, monkeypatch):
    out, results = run

    def fail(*args, **kwargs):
        raise AssertionError("train_rl called for a run already in the JSON")

    monkeypatch.setattr(bench, "train_rl", fail)
    assert _compare(bench, out) == results
    with pytest.raises(ValueError, match="other settings"):
        _compare(bench, out, alpha=0.3)


def test_plot_and_summary(bench, run):
    out, results = run
    bench.plot_training_curves(results, out / "curves.png")
    assert (out / "curves.png").stat().st_size > 10_000
    summary = bench.summarize_training(results)
    assert "| DAPO |" in summary and "| DAPO + Eq. 8 |" in summary and "Eq. 8 − DAPO" in summary


def test_train_rl_rejects_bad_reweighting_before_training():
    config = ToyPairConfig.quick()
    with pytest.raises(ValueError, match="method"):
        train_rl(None, None, config, advantage_reweighting="eq8")
    with pytest.raises(ValueError, match="reweight_alpha"):
        train_rl(None, None, config, reweight_alpha=0.2)
