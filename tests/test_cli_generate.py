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
