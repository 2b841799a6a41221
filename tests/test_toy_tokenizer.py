"""The toy tokenizer: exact round trips, special tokens, chat template, save/load."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from hf_extrapolate.toy.task import TaskConfig, imperfect_trace, reference_trace, sample_problems
from hf_extrapolate.toy.tokenizer import build_toy_tokenizer


def test_traces_and_prompts_round_trip_without_unknown_tokens():
    tokenizer = build_toy_tokenizer()
    rng = random.Random(0)
    config = TaskConfig()
    for problem in sample_problems(200, seed=0, split="any"):
        for text in (reference_trace(problem), imperfect_trace(problem, rng, config), problem.prompt):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens():
    tokenizer = build_toy_tokenizer()
    assert tokenizer.tokenize("12+305=317") == ["1", "2", "+", "3", "0", "5", "=", "3", "1", "7"]
    assert tokenizer.tokenize("x\n\\boxed{4}") == ["<unk>", "\n", "\\boxed{", "4", "}"]


def test_special_tokens_and_chat_template():
    tokenizer = build_toy_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    messages = [{"role": "user", "content": "Compute 1+2."}, {"role": "assistant", "content": "1+2=3\n\\boxed{3}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|user|>Compute 1+2.<|assistant|>1+2=3\n\\boxed{3}<eos>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|>Compute 1+2.<|assistant|>"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Compute 1+2."


def test_save_and_load_round_trip(tmp_path):
    tokenizer = build_toy_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<bos><|user|>Compute 3*4.<|assistant|>3*4=12\n\\boxed{12}<eos>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.padding_side == "left"
    batch = loaded(["1+2", "12+34"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [loaded.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
