"""Evaluation runs on tiny models: mode invariants, records, resume after interruption, data-parallel merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_extrapolate.evaluation import EvalMode, GenerationSettings, evaluate, load_problems, read_records
from hf_extrapolate.evaluation.generation import Responses
from hf_extrapolate.evaluation.runner import _records_for

from .tiny import tiny_llama

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ["What", "is", "Compute", "Please", "reason", "step", "by", "and", "put", "your", "final", "answer", "within"]
SYMBOLS = ["\\boxed{", "{", "}", "+", "-", "*", "/", "=", "?", ".", ",", "(", ")"] + list("0123456789")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|user|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a 42-token vocabulary with a chat template (no network, no hub)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\\boxed\{|[A-Za-z]+|\d|[^A-Za-z\d]"), behavior="isolated"),
    ])
    core.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, padding_side="left",
    )


def tiny_pair(vocab_size: int):
    """Base and "RL" tiny Llamas over the tokenizer's vocabulary (peaked distributions, slightly moved head)."""
    base = tiny_llama(0, vocab_size=vocab_size)
    with torch.no_grad():
        base.lm_head.weight.mul_(30)
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rl.lm_head.weight.add_(torch.randn(rl.lm_head.weight.shape, generator=g) * 0.5)
    return rl, base


def write_problems(path, n=5):
    rows = [{"id": f"q{i}", "problem": f"What is {i} + {i} ?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = build_tokenizer()
    rl, base = tiny_pair(len(tokenizer))
    problems = load_problems(write_problems(tmp_path_factory.mktemp("data") / "toy.jsonl"))
    return rl, base, tokenizer, problems


SETTINGS = GenerationSettings(max_new_tokens=6, num_samples=2, batch_size=2, temperature=0.9, top_p=0.95, seed=3)


def test_never_is_the_base_model_and_always_is_the_rl_model(setup):
    rl, base, tokenizer, problems = setup
    modes = [
        EvalMode.base(), EvalMode.rl(),
        EvalMode("never", "directional", EvalMode.replace("never").config),
        EvalMode("always", "directional", EvalMode.replace("always").config),
    ]
    records = evaluate(rl, base, tokenizer, problems[:4], modes, SETTINGS)
    by_mode = {name: [r for r in records if r["mode"] == name] for name in ("base", "rl", "never", "always")}
    assert all(len(rs) == 8 for rs in by_mode.values())
    # same prompts and seeds in every mode: replacing nothing samples the base model, replacing everything the RL one
    assert [r["text"] for r in by_mode["never"]] == [r["text"] for r in by_mode["base"]]
    assert [r["text"] for r in by_mode["always"]] == [r["text"] for r in by_mode["rl"]]
    assert [r["text"] for r in by_mode["base"]] != [r["text"] for r in by_mode["rl"]]
    assert {r["replace_ratio"] for r in by_mode["base"] + by_mode["never"]} == {0.0}
    assert {r["replace_ratio"] for r in by_mode["rl"] + by_mode["always"]} == {1.0}
    assert [(r["problem_id"], r["sample"]) for r in by_mode["base"]] == [(f"q{i}", s) for i in range(4) for s in (0, 1)]


def test_records_check_the_boxed_answer_and_count_tokens_to_the_end_of_sequence(setup):
    _, _, tokenizer, problems = setup
    prompt = tokenizer("What is 1 + 1 ?")["input_ids"]
    answers = ["\\boxed{ 2 }", "\\boxed{ 3 }"]
    rows = [prompt + tokenizer(a, add_special_tokens=False)["input_ids"] + [2, 0] for a in answers]
    sequences = torch.tensor(rows)
    gen = sequences.shape[1] - len(prompt)
    mask = torch.tensor([[True] * (gen - 1) + [False]] * 2)
    responses = Responses(sequences, len(prompt), mask, torch.tensor([0.25, 0.5]))
    problem = problems[1]  # answer "2"
    settings = GenerationSettings(num_samples=2)
    records = _records_for(responses, [problem], EvalMode.replace(), settings, tokenizer, [2])
    assert [r["extracted"] for r in records] == ["2", "3"]
    assert [r["correct"] for r in records] == [True, False]
    assert [r["length"] for r in records] == [gen - 1] * 2 and all(r["finished"] for r in records)
    assert records[0]["replace_ratio"] == 0.25 and records[0]["criterion"] == "logp_diff"
    assert records[0]["threshold"] == -0.3 and records[0]["gamma"] == 0.0 and records[0]["top_p"] == 1.0


class Interrupt(Exception):
    pass


MODES = [EvalMode.base(), EvalMode.replace("logp_diff", -0.5)]


def test_resume_after_interruption_produces_the_same_file_as_one_run(setup, tmp_path):
    rl, base, tokenizer, problems = setup
    one_run = tmp_path / "one.jsonl"
    records = evaluate(rl, base, tokenizer, problems, MODES, SETTINGS, output=one_run)
    assert len(records) == 2 * 5 * 2 and read_records(one_run) == records

    resumed = tmp_path / "resumed.jsonl"

    def stop_after_two(done, total):
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate(rl, base, tokenizer, problems, MODES, SETTINGS, output=resumed, progress=stop_after_two)
    lines = resumed.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    # a write cut off in the middle of the 7th record, as a killed process leaves it
    resumed.write_text("".join(lines[:6]) + lines[6][:40])
    calls = []
    evaluate(rl, base, tokenizer, problems, MODES, SETTINGS, output=resumed, progress=lambda d, t: calls.append(t))
    assert calls[0] == 6 - 1  # the unit whose second record was lost is generated again, the first one is not
    assert resumed.read_bytes() == one_run.read_bytes()


def test_resume_refuses_records_made_with_other_settings(setup, tmp_path):
    rl, base, tokenizer, problems = setup
    output = tmp_path / "r.jsonl"
    evaluate(rl, base, tokenizer, problems[:2], [EvalMode.base()], SETTINGS, output=output)
    other = GenerationSettings(**{**SETTINGS.__dict__, "temperature": 0.5})
    with pytest.raises(ValueError, match="temperature=0.9"):
        evaluate(rl, base, tokenizer, problems[:2], [EvalMode.base()], other, output=output)
    evaluate(rl, base, tokenizer, problems[:2], [EvalMode.base()], other, output=output, resume=False)
    assert {r["temperature"] for r in read_records(output)} == {0.5}


class FakeState:
    """Process `process_index` of a `num_processes` launch; the barrier is a no-op (the processes run in turn)."""

    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0

    def wait_for_everyone(self):
        pass


def test_data_parallel_processes_split_the_work_and_merge_into_the_single_process_file(setup, tmp_path):
    rl, base, tokenizer, problems = setup
    single = tmp_path / "single.jsonl"
    evaluate(rl, base, tokenizer, problems, MODES, SETTINGS, output=single)
    parallel = tmp_path / "parallel.jsonl"
    seen = {}
    for rank in (2, 1, 0):  # the main process last: it merges the others' part files
        evaluate(rl, base, tokenizer, problems, MODES, SETTINGS, output=parallel, state=FakeState(rank, 3),
                 progress=lambda d, t, rank=rank: seen.__setitem__(rank, t))
    assert seen == {0: 2, 1: 2, 2: 2}  # 6 units dealt round-robin
    assert parallel.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("parallel.jsonl.part*"))
