"""The paper's evaluation protocol: strict scorer, prompt, `eval --protocol paper`, `--eos-token-id`; role-relative
criteria."""

from __future__ import annotations

import argparse

import pytest
import torch

from hf_extrapolate import ExtrapolationConfig, directional_step
from hf_extrapolate.cli import CLIError
from hf_extrapolate.cli.eval import _EVAL_DEFAULTS, PAPER_PROTOCOL, apply_protocol, register
from hf_extrapolate.evaluation import (
    EvalMode,
    GenerationSettings,
    evaluate,
    extract_boxed,
    extract_boxed_strict,
    format_question,
    load_problems,
)
from hf_extrapolate.evaluation.generation import Responses
from hf_extrapolate.evaluation.runner import _records_for

from .test_evaluation_runner import build_tokenizer, tiny_pair, write_problems


@pytest.mark.parametrize(
    "text, strict, lenient",
    [
        ("so \\boxed{12}.", "12", "12"),
        ("\\boxed{1} then \\boxed{2", None, "1"),  # the last box cut off: strict reads nothing
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\fbox{3}", None, "3"),
        ("\\boxed 5", None, "5"),
        ("no box", None, None),
        ("\\boxed{1} and finally \\boxed{ 7 }", "7", "7"),
    ],
)
def test_strict_scorer_reads_only_after_the_last_boxed(text, strict, lenient):
    assert extract_boxed_strict(text) == strict
    assert extract_boxed(text) == lenient


def test_prompt_is_the_stripped_problem_and_the_instruction():
    assert format_question("  What is 1+1?\n") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def _parse(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", "--data", "x.jsonl", "--output", "o.jsonl", *argv])


def test_protocol_paper_sets_the_papers_settings_and_refuses_contradictions():
    args = _parse(["--protocol", "paper"])
    apply_protocol(args, _EVAL_DEFAULTS)
    assert {name: getattr(args, name) for name in PAPER_PROTOCOL} == {
        "num_return_sequences": 32, "temperature": 1.0, "top_p": 0.7, "top_k": 0, "max_new_tokens": 20000,
        "chat_template": True, "scorer": "strict"}
    args = _parse(["--protocol", "paper", "--scorer", "lenient"])
    with pytest.raises(CLIError, match="--scorer"):
        apply_protocol(args, _EVAL_DEFAULTS)
    args = _parse(["--protocol", "paper", "--top-p", "0.9"])
    with pytest.raises(CLIError, match="--top-p 0.7"):
        apply_protocol(args, _EVAL_DEFAULTS)
    args = _parse(["--protocol", "paper", "--top-p", "0.7"])  # agreeing with the protocol is fine
    apply_protocol(args, _EVAL_DEFAULTS)
    # the defaults the check compares with are the parser's own
    plain = _parse([])
    assert {name: getattr(plain, name) for name in _EVAL_DEFAULTS} == _EVAL_DEFAULTS


def test_records_use_the_chosen_scorer():
    tokenizer = build_tokenizer()
    prompt = tokenizer("What is 1 + 1 ?")["input_ids"]
    text = tokenizer("\\boxed{ 2 } , \\boxed{ 3", add_special_tokens=False)["input_ids"]
    sequences = torch.tensor([prompt + text + [2]])
    mask = torch.tensor([[True] * len(text) + [True]])
    responses = Responses(sequences, len(prompt), mask, torch.tensor([0.0]))
    problem = type("P", (), {"dataset": "d", "problem_id": "q1", "answer": "2"})()
    settings = GenerationSettings(num_samples=1)
    lenient = _records_for(responses, [problem], EvalMode.base(), settings, tokenizer, [2])
    strict = _records_for(responses, [problem], EvalMode.base(), settings, tokenizer, [2],
                          {"scorer": "strict", "eos_token_id": None})
    assert (lenient[0]["extracted"], lenient[0]["correct"]) == ("2", True)
    assert (strict[0]["extracted"], strict[0]["correct"]) == (None, False) and strict[0]["scorer"] == "strict"


def test_evaluate_eos_override_and_scorer_are_recorded_and_checked_on_resume(tmp_path):
    tokenizer = build_tokenizer()
    rl, base = tiny_pair(len(tokenizer))
    problems = load_problems(write_problems(tmp_path / "p.jsonl", n=2))
    settings = GenerationSettings(max_new_tokens=6, num_samples=2, batch_size=2)
    out = tmp_path / "r.jsonl"
    stop = tokenizer.convert_tokens_to_ids("=")
    records = evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, output=out, scorer="strict",
                       eos_token_id=[stop])
    assert all(r["scorer"] == "strict" and r["eos_token_id"] == [stop] for r in records)
    assert len(records) == 4 and all(r["length"] <= 6 for r in records)
    with pytest.raises(ValueError, match="scorer"):
        evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, output=out, eos_token_id=[stop])
    with pytest.raises(ValueError, match="eos_token_id"):
        evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, output=out, scorer="strict")
    with pytest.raises(ValueError, match="`scorer`"):
        evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, scorer="exact")
    with pytest.raises(ValueError, match="`eos_token_id`"):
        evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, eos_token_id=[])


def test_eos_override_ends_responses_at_that_token(tmp_path):
    tokenizer = build_tokenizer()
    rl, base = tiny_pair(len(tokenizer))
    problems = load_problems(write_problems(tmp_path / "p.jsonl", n=2))
    settings = GenerationSettings(max_new_tokens=8, num_samples=4, batch_size=2, temperature=1.0)
    plain = evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings)
    # pick a token the plain run generates, and end responses there
    counts: dict[int, int] = {}
    for r in plain:
        for t in tokenizer(r["text"], add_special_tokens=False)["input_ids"]:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)
    stopped = evaluate(rl, base, tokenizer, problems, [EvalMode.base()], settings, eos_token_id=[stop])
    assert any(r["finished"] for r in stopped)
    assert sum(r["length"] for r in stopped) < sum(r["length"] for r in plain)


# ------------------------------------------------------------------------------------------- role-relative criteria
def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 9, generator=g).log_softmax(-1), torch.randn(4, 9, generator=g).log_softmax(-1)


def test_role_relative_criteria_are_logp_diff_in_the_matching_role():
    rl, base = _pair()
    for gamma in (0.0, 0.1):
        same = dict(threshold=-0.3, gamma=gamma, top_p=0.9)
        base_proposing = directional_step(rl, base, ExtrapolationConfig(criterion="logp_diff", **same))[0]
        torch.testing.assert_close(directional_step(rl, base, ExtrapolationConfig(
            criterion="logp_other_minus_proposal", **same))[0], base_proposing)
        rl_proposing = directional_step(rl, base, ExtrapolationConfig(criterion="logp_diff", proposal="rl", **same))[0]
        torch.testing.assert_close(directional_step(rl, base, ExtrapolationConfig(
            criterion="logp_proposal_minus_other", proposal="rl", **same))[0], rl_proposing)


def test_with_the_rl_model_proposing_the_two_definitions_gate_opposite_tails():
    """logp_diff fires where the RL model lowered the token, logp_other_minus_proposal where it raised it."""
    rl, base = _pair(1)
    tau = -0.3
    diff = rl - base
    p = rl.exp()
    expected_logp_diff = (p * (diff < tau)).sum(-1)
    expected_role = (p * (-diff < tau)).sum(-1)  # l_base - l_rl < tau: the RL model raised the token by > 0.3
    _, m_diff = directional_step(rl, base, ExtrapolationConfig(criterion="logp_diff", proposal="rl", threshold=tau))
    _, m_role = directional_step(rl, base, ExtrapolationConfig(criterion="logp_other_minus_proposal", proposal="rl",
                                                               threshold=tau))
    torch.testing.assert_close(m_diff, expected_logp_diff)
    torch.testing.assert_close(m_role, expected_role)
    assert (diff < tau).logical_and(-diff < tau).sum() == 0  # disjoint tails
    assert (m_diff - m_role).abs().max() > 0.05
