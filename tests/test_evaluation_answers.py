"""Pure evaluation parts: Pass@k, answer extraction and verification, summaries, data files and prompts."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from hf_extrapolate.evaluation import (
    build_prompt,
    default_ks,
    extract_boxed,
    format_summary,
    is_correct,
    load_datasets,
    load_problems,
    pass_at_k,
    per_problem_accuracy,
    summarize,
)

EXAMPLE_DATA = Path(__file__).parents[1] / "examples" / "data"  # shipped: 8 problems of each set


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-15)


def test_pass_at_1_is_the_fraction_correct_and_large_n_is_stable():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1024, 1, 1024) == 1.0
    assert 0.0 < pass_at_k(1024, 1, 1) < pass_at_k(1024, 1, 512) < 1.0


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [(0, 0, 1, "`n`"), (4, 5, 1, "`c`"), (4, 1, 5, "`k`"), (4, 1, 0, "`k`"), (4, -1, 1, "`c`")],
)
def test_pass_at_k_rejects_impossible_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="`k`"):
        pass_at_k(4, 1, 1.0)


EXTRACTION = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
    ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{ x = 3 }", "x = 3"),
    ("cut off: \\boxed{3} and then \\boxed{\\frac{1", "3"),
    ("\\boxedfoo{3}", None),
    ("no box at all: 17", None),
    ("", None),
    ("\\boxed{}", ""),
    ("\\boxed {12}", "12"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION)
def test_extract_boxed_table(text, expected):
    assert extract_boxed(text) == expected


VERIFICATION = [
    ("\\frac{1}{2}", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("(0,1]", "(0, 1]", True),
    ("[0,1)", "(0,1]", False),
    ("5 \\text{ cm}", "5", True),
    ("30^\\circ", "30", True),
    ("\\text{(B)}", "B", True),
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("x = 3", "3", True),
    ("1,000", "1000", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("-2", "2", False),
    ("3", "18", False),
    ("\\pi", "3.14159", False),
    (None, "3", False),
    ("", "3", False),
]


@pytest.mark.parametrize(("prediction", "reference", "expected"), VERIFICATION)
def test_is_correct_table(prediction, reference, expected):
    assert is_correct(prediction, reference) is expected


def _record(mode, problem, sample, correct, length=10, ratio=0.0, dataset="d"):
    return {"mode": mode, "dataset": dataset, "problem_id": problem, "sample": sample, "correct": correct,
            "length": length, "replace_ratio": ratio, "kind": "base", "criterion": None, "threshold": None,
            "gamma": None, "proposal": None}


def test_summary_avg_pass_length_and_ratio():
    # p1: 1 of 4 correct, p2: 4 of 4 correct
    records = [_record("m", "p1", s, s == 0, length=10 * (s + 1), ratio=0.1) for s in range(4)]
    records += [_record("m", "p2", s, True, length=5, ratio=0.3) for s in range(4)]
    (row,) = summarize(records)
    assert row["problems"] == 2 and row["samples_per_problem"] == 4
    assert row["avg_at_k"] == pytest.approx(5 / 8)
    assert row["pass_at_k"] == {
        "1": pytest.approx((0.25 + 1) / 2), "2": pytest.approx((0.5 + 1) / 2), "4": pytest.approx(1.0)
    }
    assert row["mean_length"] == pytest.approx((10 + 20 + 30 + 40 + 4 * 5) / 8)
    assert row["replace_ratio"] == pytest.approx(0.2)
    assert per_problem_accuracy(records) == {("m", "d"): {"p1": 0.25, "p2": 1.0}}
    table = format_summary([row])
    assert "| d | m | 2 | 4 | 62.5 | 62.5 | 75.0 | 100.0 | 15 | 20.0% |" in table


def test_default_ks_are_powers_of_two_and_n():
    assert default_ks(1) == [1]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(8) == [1, 2, 4, 8]


def test_load_problems_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n\n" + json.dumps(
        {"id": "x", "problem": "2+2?", "answer": 4}) + "\n")
    problems = load_problems(path)
    assert [(p.dataset, p.problem_id, p.index, p.answer) for p in problems] == [("mine", "mine-0", 0, "2"),
                                                                                ("mine", "x", 1, "4")]
    assert len(load_problems(path, limit=1)) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        load_problems(bad)
    with pytest.raises(ValueError, match="same name"):
        load_datasets([path, path])


def test_shared_datasets_load_and_references_verify_against_themselves():
    names = ["aime24", "aime25", "amc23", "math500", "minerva", "gsm8k_test"]
    problems = load_datasets([EXAMPLE_DATA / f"{name}.jsonl" for name in names], limit=8)
    assert [p.dataset for p in problems[::8]] == names
    for problem in problems:
        assert problem.problem and problem.answer
        assert is_correct(problem.answer, problem.answer), problem


class _ChatTokenizer:
    chat_template = "{{ messages[0]['content'] }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}<assistant>"


def test_prompt_is_the_papers_instruction_in_the_chat_template():
    question = "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert build_prompt("What is 1+1?", chat_template=False) == question
    assert build_prompt("What is 1+1?", _ChatTokenizer()) == f"<user>{question}<assistant>"
    with pytest.raises(ValueError, match="--no-chat-template"):
        build_prompt("What is 1+1?", object())


def _extract_boxed_by_rescanning(text):
    """The old, independent definition: for each box from the last, balance braces from its `{` to the end."""
    import re

    def braced(start):
        depth, i = 0, start
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if text[i] == "}" and depth == 0:
                return i + 1
            i += 1
        return None

    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text or ""))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = braced(i)
            if close is not None:
                return text[i + 1 : close - 1].strip()
        elif i > match.end():
            bare = re.match(r"[^\s$]+", text[i:])
            if bare:
                return bare.group(0)
    return None


def test_extract_boxed_matches_the_rescanning_definition_on_random_text():
    import random

    rng = random.Random(0)
    pieces = ["\\boxed", "\\fbox", "\\boxedx", "{", "}", "\\{", "\\}", "\\\\", " ", "\t", "$", "1", "ab", "\\frac"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert extract_boxed(text) == _extract_boxed_by_rescanning(text), text


def test_extract_boxed_matches_braces_once_per_call(monkeypatch):
    """Degenerate responses with thousands of unclosed boxes: one brace pass, not one per box (was quadratic)."""
    from hf_extrapolate.evaluation import answers

    calls = []
    original = answers._closing_braces
    monkeypatch.setattr(answers, "_closing_braces", lambda text: calls.append(1) or original(text))
    assert extract_boxed("\\boxed{1 " * 4000) is None
    assert extract_boxed("\\boxed{2} " + "\\boxed{" * 8000) == "2"
    assert len(calls) == 2


def test_is_correct_works_from_other_threads():
    """Math-Verify's signal-based time bound fails outside the main thread; there the check runs in a helper process
    and gives the main thread's answers."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [("\\frac12", "0.5"), ("3", "0.5"), ("(1, 2]", "(1,2]"), ("x^2", "x^{2}"), ("12", "12")]
    expected = [is_correct(p, r) for p, r in cases]
    assert expected == [True, False, True, True, True]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda pr: is_correct(*pr), cases)) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"problem": "p", "answer": null}', "'answer' (=None) must be a non-empty string"),
        ('{"problem": "p", "answer": ["2", "3"]}', "'answer' (=['2', '3'])"),
        ('{"problem": "p", "answer": " "}', "'answer'"),
        ('{"problem": null, "answer": "2"}', "'problem' (=None) must be a non-empty string"),
        ('{"problem": "", "answer": "2"}', "'problem' (='') must be"),
    ],
)
def test_load_problems_refuses_answers_and_problems_that_are_not_text(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
        load_problems(path)


def test_load_problems_numbers_non_utf8_and_foreign_records(tmp_path):
    from hf_extrapolate.evaluation import read_records

    path = tmp_path / "numbers.jsonl"
    path.write_text('{"problem": "1+1", "answer": 2}\n{"problem": "1/2", "answer": 0.5}\n')
    assert [p.answer for p in load_problems(path)] == ["2", "0.5"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{re.escape(str(latin))} is not UTF-8"):
        load_problems(latin)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"foreign.jsonl:1 is not an evaluation record \(it lacks \['mode'"):
        read_records(foreign)
    with pytest.raises(ValueError, match=r"record 2 lacks \['correct'\]"):
        summarize([{"mode": "rl", "dataset": "d", "problem_id": "0", "correct": True, "length": 3},
                   {"mode": "rl", "dataset": "d", "problem_id": "1", "length": 3}])


def test_two_merges_into_one_output_do_not_collide(tmp_path):
    """Two runs merging into the same output used one fixed `<output>.tmp`: FileNotFoundError in a tight loop."""
    import threading

    from hf_extrapolate.evaluation.results import append_records, merge_results

    output = tmp_path / "out.jsonl"
    records = [{"mode": "rl", "dataset": "d", "problem_id": str(i), "sample": 0, "correct": True} for i in range(50)]
    append_records(output, records)
    errors = []

    def merge_many():
        try:
            for _ in range(100):
                merge_results(output)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=merge_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert [r["problem_id"] for r in merge_results(output)] == [str(i) for i in range(50)]
    assert not list(tmp_path.glob("*.tmp"))


def test_accuracy_plot_has_no_negative_axis_when_everything_is_zero(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hf_extrapolate.evaluation import plot_accuracy_vs_ratio

    limits = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: limits.extend(ax.get_ylim() for ax in self.axes)
                        or original(self, *a, **k))
    common = dict(dataset="d", criterion=None, gamma=None, proposal=None, avg_at_k=0.0)
    rows = [dict(common, mode="base", kind="base", replace_ratio=0.0),
            dict(common, mode="rl", kind="rl", replace_ratio=1.0),
            dict(common, mode="replace:logp_diff@-0.3", kind="directional", criterion="logp_diff", gamma=0.0,
                 proposal="base", replace_ratio=0.05)]
    plot_accuracy_vs_ratio(rows, tmp_path / "zero.png")
    rows[1]["avg_at_k"] = 0.5
    plot_accuracy_vs_ratio(rows, tmp_path / "half.png")
    assert limits[0][0] == 0 and limits[0][1] > 0 and limits[1] == (0, 54.0)
