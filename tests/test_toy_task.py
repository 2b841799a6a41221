"""The toy task: verifier, traces, seeded problem generator, train/held-out split, prompt format."""

from __future__ import annotations

import random

import pytest

from hf_extrapolate.toy.task import (
    Problem,
    TaskConfig,
    boxed_reward,
    extract_boxed,
    imperfect_trace,
    parse_integer,
    reference_trace,
    sample_problems,
    solution_steps,
    verify,
    worked_example,
    write_problems_jsonl,
)

VERIFY_CASES = [
    # (completion, answer, reward)
    ("5*3=15\n7+15=22\n22-2=20\n\\boxed{20}", 20, 1.0),
    ("\\boxed{20}", "20", 1.0),
    ("\\boxed{ 20 }", 20, 1.0),
    ("\\boxed{-3}", -3, 1.0),
    ("\\boxed{+3}", 3, 1.0),
    ("\\boxed{007}", 7, 1.0),
    ("\\boxed{21} no, \\boxed{20}", 20, 1.0),  # the last box counts
    ("\\boxed{20} no, \\boxed{21}", 20, 0.0),
    ("the answer is 20", 20, 0.0),  # no box, no reward
    ("\\boxed{20", 20, 0.0),  # unclosed
    ("\\boxed{}", 0, 0.0),
    ("\\boxed{2.0}", 2, 0.0),
    ("\\boxed{1 0}", 10, 0.0),
    ("\\boxed{{20}}", 20, 0.0),
    ("\\boxed{20}", 21, 0.0),
    ("", 0, 0.0),
]


@pytest.mark.parametrize("completion, answer, reward", VERIFY_CASES)
def test_verify_table(completion, answer, reward):
    assert verify(completion, answer) == reward


@pytest.mark.parametrize(
    "text, content",
    [("a \\boxed{1} b \\boxed{2}", "2"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{3", None), ("3", None)],
)
def test_extract_boxed_takes_the_last_balanced_box(text, content):
    assert extract_boxed(text) == content


def test_parse_integer_rejects_non_integers():
    assert parse_integer(" -12 ") == -12
    assert [parse_integer(t) for t in (None, "", "1.5", "x", "1e3", "--1")] == [None] * 6


def test_boxed_reward_takes_strings_and_conversations():
    completions = ["\\boxed{4}", [{"role": "assistant", "content": "2+2=4\n\\boxed{4}"}], "\\boxed{5}"]
    assert boxed_reward(completions, answer=[4, 4, 4]) == [1.0, 1.0, 0.0]


def test_reference_trace_follows_operator_precedence():
    problem = Problem((7, 5, 3, 2), ("+", "*", "-"))
    assert problem.expression == "7+5*3-2" and problem.answer == 20 and problem.precedence_matters
    assert reference_trace(problem) == "5*3=15\n7+15=22\n22-2=20\n\\boxed{20}"
    left_to_right = solution_steps(problem, left_to_right=True)
    assert [str(s) for s in left_to_right] == ["7+5=12", "12*3=36", "36-2=34"]
    assert [s.rest for s in left_to_right] == ["12*3-2", "36-2", "34"]
    assert worked_example(problem) == "Compute 7+5*3-2.\n" + reference_trace(problem)
    assert not Problem((2, 3, 4), ("*", "+")).precedence_matters


def test_reference_traces_always_verify():
    for problem in sample_problems(300, seed=0, split="any"):
        assert verify(reference_trace(problem), problem.answer) == 1.0


def test_imperfect_traces_without_mistakes_are_the_reference():
    config = TaskConfig(p_left_to_right=0.0, p_stop_early=0.0, p_slip=0.0)
    rng = random.Random(0)
    for problem in sample_problems(100, seed=1, config=config):
        assert imperfect_trace(problem, rng, config) == reference_trace(problem)


def test_imperfect_traces_are_wrong_at_the_configured_rate():
    def wrong_rate(config, problems):
        rng = random.Random(0)
        return sum(verify(imperfect_trace(p, rng, config), p.answer) == 0.0 for p in problems) / len(problems)

    config = TaskConfig(p_left_to_right=0.6, p_stop_early=0.0, p_slip=0.0)
    matters = [p for p in sample_problems(3000, seed=2, config=config) if p.precedence_matters]
    assert 0.55 < wrong_rate(config, matters) < 0.65
    config = TaskConfig(p_left_to_right=0.0, p_stop_early=0.6, p_slip=0.0)
    long = [p for p in sample_problems(3000, seed=3, config=config) if len(p.operators) == 3]
    assert 0.5 < wrong_rate(config, long) < 0.62  # boxing one step early is wrong unless the last step is +0/-0/*1
    config = TaskConfig(num_operators=(3,), p_left_to_right=0.0, p_stop_early=0.0, p_slip=0.1)
    assert 0.22 < wrong_rate(config, sample_problems(3000, seed=4, config=config)) < 0.32  # 1 - 0.9**3 = 0.27


def test_sample_problems_is_deterministic_and_respects_the_config():
    config = TaskConfig()
    first = sample_problems(50, seed=7, config=config)
    assert first == sample_problems(50, seed=7, config=config)
    assert first != sample_problems(50, seed=8, config=config)
    for problem in first:
        assert len(problem.operators) in config.num_operators and problem.operators.count("*") <= 1
        assert all(1 <= x <= 9 for x in problem.operands)
        assert all(step.result >= 0 for step in solution_steps(problem))


def test_held_out_split_is_disjoint_from_train():
    held_out = sample_problems(200, seed=0, split="held_out")
    train = sample_problems(2000, seed=0, split="train")
    assert all(p.held_out for p in held_out) and not any(p.held_out for p in train)
    assert not {p.expression for p in held_out} & {p.expression for p in train}


def test_prompt_is_the_library_evaluation_prompt(tmp_path):
    from hf_extrapolate.evaluation import format_question, load_problems

    problems = sample_problems(5, seed=0, split="held_out")
    assert all(p.prompt == format_question(p.statement) for p in problems)
    write_problems_jsonl(tmp_path / "toy.jsonl", problems)
    loaded = load_problems(tmp_path / "toy.jsonl")
    assert [(q.problem, q.answer) for q in loaded] == [(p.statement, str(p.answer)) for p in problems]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_operand=5, max_operand=2), "min_operand"),
        (dict(num_operators=()), "num_operators"),
        (dict(p_slip=1.5), "p_slip"),
        (dict(max_multiplications=-1), "max_multiplications"),
    ],
)
def test_task_config_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskConfig(**kwargs)


def test_problem_validation():
    with pytest.raises(ValueError, match="one more operand"):
        Problem((1, 2), ("+", "+"))
    with pytest.raises(ValueError, match="Unknown operator"):
        Problem((1, 2), ("/",))
