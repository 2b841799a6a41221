"""The toy base/RLVR pair: config, a quick end-to-end build through the CLI, and the shipped assets."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_extrapolate.cli import main
from hf_extrapolate.toy import (
    TOY_PAIR_DIR,
    ToyPairConfig,
    held_out_problems,
    load_toy_pair,
    reference_trace,
    toy_pair_info,
)
from hf_extrapolate.toy.task import accuracy
from hf_extrapolate.toy.tokenizer import build_toy_tokenizer
from hf_extrapolate.toy.train import generate_completions, sft_batch

HAS_SHIPPED_PAIR = os.path.isfile(os.path.join(TOY_PAIR_DIR, "rl", "config.json"))
shipped = pytest.mark.skipif(not HAS_SHIPPED_PAIR, reason="toy assets not installed")


def test_config_round_trips_and_validates():
    config = ToyPairConfig(seed=3, sft_steps=10)
    assert ToyPairConfig(**json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="rl_num_generations"):
        ToyPairConfig(rl_num_generations=1)
    with pytest.raises(ValueError, match="hidden_size"):
        ToyPairConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="rl_steps_per_generation"):
        ToyPairConfig(rl_prompts_per_generation=3, rl_num_generations=3, rl_steps_per_generation=2)
    with pytest.raises(ValueError, match="save_dtype"):
        ToyPairConfig(save_dtype="int8")


def test_sft_batch_trains_only_on_the_completion():
    tokenizer = build_toy_tokenizer()
    problems = held_out_problems(n=2)
    completions = [reference_trace(p) for p in problems]
    batch = sft_batch(tokenizer, problems, completions)
    for row, labels, mask, completion in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], completions):
        target = labels[labels != -100].tolist()
        assert target[-1] == tokenizer.eos_token_id and tokenizer.decode(target[:-1]) == completion
        assert row[mask.bool()][-len(target) :].tolist() == target  # the labelled tokens end the real tokens


@pytest.fixture(scope="module")
def quick_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "pair"
    assert main(["toy-pair", "--out", str(out), "--quick", "--no-progress"]) == 0
    return out


def test_quick_build_writes_loadable_model_folders(quick_pair, capsys):
    for role in ("base", "rl"):
        names = set(os.listdir(quick_pair / role))
        assert {"config.json", "model.safetensors", "tokenizer.json", "toy_pair.json"} <= names
    rl_model, base_model, tokenizer = load_toy_pair(quick_pair)
    assert not rl_model.training and rl_model.dtype == torch.float32
    assert rl_model.config.use_cache and base_model.config.to_dict().keys() == rl_model.config.to_dict().keys()
    info = toy_pair_info(quick_pair)
    assert info["rl"]["base_accuracy"] == info["base"]["accuracy"]
    assert set(info["rl"]["accuracy"]) == {"greedy", "sampled"} and "total" in info["rl"]["seconds"]
    completions = generate_completions(rl_model, tokenizer, held_out_problems(n=2), max_new_tokens=8)
    assert len(completions) == 2


def test_cli_refuses_to_overwrite_without_force(quick_pair, capsys):
    assert main(["toy-pair", "--out", str(quick_pair), "--quick", "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err


def test_demo_runs_on_a_built_pair_and_its_held_out_problems(quick_pair, capsys):
    code = main(["demo", "--pair", str(quick_pair), "--show", "1", "--eval-problems", "4", "--samples", "1",
                 "--no-color"])
    out = capsys.readouterr().out
    config = ToyPairConfig(**toy_pair_info(quick_pair)["rl"]["config"])
    first = held_out_problems(config, n=1)[0]
    assert code == 0 and f"{first.statement}   (answer {first.answer})" in out
    assert "Accuracy on 4 held-out problems, 1 sample(s) each" in out


def test_load_toy_pair_explains_a_missing_pair(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy-pair --out"):
        load_toy_pair(tmp_path)


@shipped
def test_shipped_pair_is_small():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(TOY_PAIR_DIR) for f in files)
    assert size < 5 * 2**20


@shipped
def test_shipped_rl_model_beats_the_base_model_greedy():
    rl_model, base_model, tokenizer = load_toy_pair()
    problems = held_out_problems(n=50)
    rl = accuracy(generate_completions(rl_model, tokenizer, problems), problems)
    base = accuracy(generate_completions(base_model, tokenizer, problems), problems)
    assert rl >= base + 0.06, (rl, base)
    info = toy_pair_info()
    assert info["rl"]["accuracy"]["greedy"] > info["base"]["accuracy"]["greedy"]
    assert info["rl"]["accuracy"]["sampled"] > info["base"]["accuracy"]["sampled"]
