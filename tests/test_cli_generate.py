"""`hf-extrapolate generate` end to end on tiny models saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_extrapolate.cli import main
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok = tiny_tokenizer()
    for name, seed in (("rl", 0), ("base", 1)):
        tiny_llama(seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft_model.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    (root / "prompts.jsonl").write_text('{"prompt": "w5 w6 w7"}\n{"problem": "w9"}\n\n{"prompt": "w3 w4"}\n')
    return root


def test_generate_one_prompt_prints_json(pair, capsys):
    code = main(["generate", "--model", str(pair / "rl"), "--base", str(pair / "base"), "--prompt", "w5 w6",
                 "--max-new-tokens", "5", "--gamma", "0.1", "--threshold", "-0.1", "--num-return-sequences", "2",
                 "--device", "cpu"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1] and all(0 <= r["replace_ratio"] <= 1 for r in rows)
    assert all(1 <= r["num_tokens"] <= 5 for r in rows)


def test_generate_file_to_output_greedy_is_deterministic(pair, tmp_path):
    args = ["generate", "--model", str(pair / "rl"), "--base", str(pair / "base"), "--prompts-file",
            str(pair / "prompts.jsonl"), "--temperature", "0", "--max-new-tokens", "4", "--batch-size", "2",
            "--no-chat-template", "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert main(args + ["--output", str(tmp_path / "b.jsonl"), "--seed", "7"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["index"] for r in a] == [0, 1, 2] and a[1]["prompt"] == "w9"
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert all(r["replace_ratio"] in (0.0, 1.0) or 0 < r["replace_ratio"] < 1 for r in a)


def test_generate_with_lora_adapter(pair, capsys):
    assert main(["generate", "--adapter", str(pair / "adapter"), "--prompt", "w5", "--max-new-tokens", "3",
                 "--device", "cpu", "--no-chat-template"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "w5"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/nonexistent/rl", "--base", "/nonexistent/base"], "no such folder"),
        (["--model", "RL_PLACEHOLDER"], "--base"),
        (["--model", "RL_PLACEHOLDER", "--base", "BASE_PLACEHOLDER", "--criterion", "random", "--threshold", "2"],
         "threshold"),
        (["--model", "RL_PLACEHOLDER", "--base", "BASE_PLACEHOLDER", "--batch-size", "0"], "must be positive"),
    ],
)
def test_generate_errors_are_one_line(pair, capsys, extra, message):
    extra = [x.replace("RL_PLACEHOLDER", str(pair / "rl")).replace("BASE_PLACEHOLDER", str(pair / "base")) for x in extra]
    assert main(["generate", "--prompt", "w5", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_mismatched_tokenizers_one_line(tmp_path, capsys):
    for name, seed, shift in (("rl", 0, 0), ("base", 1, 1)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
        tiny_tokenizer(shift=shift).save_pretrained(tmp_path / name)
    assert main(["generate", "--model", str(tmp_path / "rl"), "--base", str(tmp_path / "base"), "--prompt", "w5",
                 "--device", "cpu"]) == 2
    assert "different tokenizers" in capsys.readouterr().err


def _fake_hub_cache(root, repo_id, source):
    """`source`'s files as the local hub cache holds `repo_id` (what from_pretrained finds with HF_HUB_OFFLINE=1)."""
    import shutil

    commit = "0" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_generate_accepts_hub_ids_from_the_local_cache(pair, tmp_path, capsys):
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someorg/tiny-rl", pair / "rl")
    _fake_hub_cache(cache, "someorg/tiny-base", pair / "base")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's hf_extrapolate
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "hf_extrapolate.cli", "generate", "--prompt", "w5 w6", "--max-new-tokens", "4",
           "--temperature", "0", "--device", "cpu", "--no-chat-template"]
    hub = subprocess.run(cmd + ["--model", "someorg/tiny-rl", "--base", "someorg/tiny-base"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert hub.returncode == 0, hub.stderr
    assert main(cmd[3:] + ["--model", str(pair / "rl"), "--base", str(pair / "base")]) == 0
    assert hub.stdout == capsys.readouterr().out and json.loads(hub.stdout)["num_tokens"] >= 1


def test_generate_accepts_a_saved_pair_folder(pair, tmp_path, capsys):
    from hf_extrapolate import DirectionalModelForCausalLM

    model = DirectionalModelForCausalLM.from_pretrained(pair / "rl", base_model=pair / "base")
    model.save_pretrained(tmp_path / "saved")
    args = ["generate", "--prompt", "w5 w6", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu",
            "--no-chat-template", "--gamma", "0.1"]
    assert main(args + ["--model", str(pair / "rl"), "--base", str(pair / "base")]) == 0
    two = capsys.readouterr().out
    assert main(args + ["--model", str(tmp_path / "saved")]) == 0
    assert capsys.readouterr().out == two
    assert main(args + ["--model", str(pair / "adapter")]) == 0  # an adapter folder as --model = --adapter
    assert main(args + ["--adapter", str(pair / "adapter")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "RL", "--base", "BASE", "--device", "bogus"], "--device bogus: not a device name"),
        (["--model", "RL", "--base", "BASE", "--device", "cuda"], "--device cuda: no cuda device is available"),
        (["--adapter", "RL"], "not a LoRA adapter folder"),
    ],
)
def test_device_and_adapter_errors_are_one_line(pair, capsys, extra, message):
    if message.startswith("--device cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    extra = [x.replace("RL", str(pair / "rl")).replace("BASE", str(pair / "base")) for x in extra]
    assert main(["generate", "--prompt", "w5", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_reasoning_prompt_matches_eval_and_help_says_what_proposes(pair, capsys):
    from hf_extrapolate.cli import build_parser
    from hf_extrapolate.evaluation.prompts import format_question

    args = ["generate", "--model", str(pair / "rl"), "--base", str(pair / "base"), "--max-new-tokens", "4",
            "--temperature", "0", "--device", "cpu", "--no-chat-template"]
    assert main(args + ["--prompt", "w5 w6", "--reasoning-prompt"]) == 0
    with_suffix = json.loads(capsys.readouterr().out)
    assert main(args + ["--prompt", format_question("w5 w6")]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == with_suffix["completion"]
    assert with_suffix["prompt"] == "w5 w6"
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = " ".join(sub.format_help().split())
    assert "default: base, as in Algorithm 1" in text and "--proposal rl is the paper's Table 1" in text
    assert "Avg@k" not in text and "extrapolate mode" not in text


def test_small_models_run_on_one_thread_unless_told(pair, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    args = ["generate", "--model", str(pair / "rl"), "--base", str(pair / "base"), "--prompt", "w5",
            "--max-new-tokens", "2", "--device", "cpu", "--no-chat-template"]
    try:
        torch.set_num_threads(2)
        assert main(args) == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["--threads", "2", *args]) == 0 and torch.get_num_threads() == 2
        assert main(["--threads", "0", *args]) == 2 and "--threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(previous)


def test_tokenizer_check_in_eval_and_its_switch(tmp_path, capsys):
    for name, seed, shift in (("rl", 0, 0), ("base", 1, 1)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
        tiny_tokenizer(shift=shift).save_pretrained(tmp_path / name)
    (tmp_path / "p.jsonl").write_text('{"problem": "w5", "answer": "1"}\n')
    common = ["--model", str(tmp_path / "rl"), "--base", str(tmp_path / "base"), "--device", "cpu",
              "--no-chat-template", "--max-new-tokens", "2"]
    evaluation = ["eval", *common, "--data", str(tmp_path / "p.jsonl"), "--modes", "base", "--no-progress",
                  "--output", str(tmp_path / "out.jsonl")]
    assert main(evaluation) == 2
    assert "different tokenizers" in capsys.readouterr().err
    assert main(["generate", *common, "--prompt", "w5", "--no-tokenizer-check"]) == 0
    assert main([*evaluation, "--no-tokenizer-check"]) == 0


def test_generate_engine_vllm_refusals_are_one_line(pair, capsys, monkeypatch):
    import importlib.util

    base = ["generate", "--model", str(pair / "rl"), "--base", str(pair / "base"), "--prompt", "w5", "--engine", "vllm"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    for extra, message in ((["--device", "cpu"], "--engine vllm places the models itself"),
                           (["--adapter", str(pair / "adapter")], "merge_and_unload")):
        argv = list(base)
        if "--adapter" in extra:
            argv[argv.index("--model") : argv.index("--model") + 2] = []
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(base) == 2
    assert "vLLM is not installed" in capsys.readouterr().err
