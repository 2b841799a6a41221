"""The toy verifiable task: multi-step integer arithmetic, solved as a short chain of thought ending in `\\boxed{N}`.

A problem is an expression of 3 or 4 operands in 1..9 joined by `+`, `-`, `*` (at most one `*`, no negative
intermediate result), e.g. `7+5*3-2`. The prompt is the paper's: `Compute 7+5*3-2.` then `Please reason step by
step, and put your final answer within \\boxed{}.` The reference trace does one operation per line in
operator-precedence order and boxes the result::

    5*3=15
    7+15=22
    22-2=20
    \\boxed{20}

The verifier reads the *last* `\\boxed{...}` of a completion and gives reward 1.0 when it holds the integer answer,
else 0.0 (no partial credit, no format reward).

The base model learns from *imperfect* traces written by a sloppy student (`TaskConfig`): on problems where
precedence matters it sometimes works left to right (`p_left_to_right`: `7+5=12` instead of `5*3=15`), on
three-operator problems it often boxes the intermediate result one step early (`p_stop_early`), and any step may
hold an arithmetic slip carried on consistently (`p_slip`). Each mistake is decided at one or two tokens, which is
what RLVR then changes. Alongside, `worked_example` gives correct plain-text solutions (the "pretraining" text that
teaches the skill the chats' habits then misuse).

Problems are split into train and held-out sets by a hash of their expression, so no held-out expression is ever
trained on. This module does not know about tokenizers or models.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OPERATORS = ("+", "-", "*")
# The paper's prompt (= `hf_extrapolate.evaluation.format_question`), frozen here: it is what the toy pair was
# trained on, so the library's evaluation pipeline runs on the toy pair unchanged.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HELD_OUT_MODULUS = 10  # one expression in ten (by CRC32) is held out

_BOXED = "\\boxed{"
_INT = re.compile(r"^[+-]?\d+$")


@dataclass
class TaskConfig:
    """What problems look like and how sloppy the base-stage traces are."""

    min_operand: int = field(default=1, metadata={"help": "Smallest operand (inclusive)."})
    max_operand: int = field(default=9, metadata={"help": "Largest operand (inclusive)."})
    num_operators: tuple[int, ...] = field(
        default=(2, 3), metadata={"help": "Allowed numbers of operators per problem, drawn uniformly."}
    )
    p_multiply: float = field(
        default=0.5, metadata={"help": "Probability of `*` for each operator; `+` and `-` share the rest."}
    )
    max_multiplications: int | None = field(
        default=1, metadata={"help": "At most this many `*` per problem (redrawn otherwise); None: no limit."}
    )
    allow_negative: bool = field(
        default=False,
        metadata={"help": "Whether reference solutions may have negative intermediate results (redrawn if not)."},
    )
    p_left_to_right: float = field(
        default=0.3,
        metadata={
            "help": "Imperfect traces: probability that a problem whose answer depends on operator precedence is "
            "worked strictly left to right (a wrong method)."
        },
    )
    p_stop_early: float = field(
        default=0.6,
        metadata={
            "help": "Imperfect traces: probability that a problem with 3 or more operators is answered one step "
            "early (the last intermediate result is boxed)."
        },
    )
    p_slip: float = field(
        default=0.1,
        metadata={"help": "Imperfect traces: probability of an arithmetic slip in each step (carried on after)."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.min_operand, int) or not isinstance(self.max_operand, int):
            raise TypeError(
                f"`min_operand` (={self.min_operand!r}) and `max_operand` (={self.max_operand!r}) must be integers."
            )
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"Need 0 <= `min_operand` (={self.min_operand}) <= `max_operand` (={self.max_operand}); "
                "e.g. min_operand=1, max_operand=9."
            )
        self.num_operators = tuple(self.num_operators)
        if not self.num_operators or any(not isinstance(n, int) or n < 1 for n in self.num_operators):
            raise ValueError(
                f"`num_operators` (={self.num_operators!r}) must be a non-empty tuple of positive integers, e.g. (2, 3)."
            )
        if self.max_multiplications is not None and (
            not isinstance(self.max_multiplications, int) or self.max_multiplications < 0
        ):
            raise ValueError(
                f"`max_multiplications` (={self.max_multiplications!r}) must be a non-negative integer or None."
            )
        for name in ("p_multiply", "p_left_to_right", "p_stop_early", "p_slip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` (={value!r}) is a probability and must lie in [0, 1].")
            setattr(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_operand": self.min_operand,
            "max_operand": self.max_operand,
            "num_operators": list(self.num_operators),
            "p_multiply": self.p_multiply,
            "max_multiplications": self.max_multiplications,
            "allow_negative": self.allow_negative,
            "p_left_to_right": self.p_left_to_right,
            "p_stop_early": self.p_stop_early,
            "p_slip": self.p_slip,
        }


@dataclass(frozen=True)
class Step:
    """One line of a trace, `left operator right = result` (the result may be a slip), and the expression left
    after it (`rest`, not written in the trace)."""

    left: int
    operator: str
    right: int
    result: int
    rest: str

    def __str__(self) -> str:
        return f"{self.left}{self.operator}{self.right}={self.result}"


@dataclass(frozen=True)
class Problem:
    """An arithmetic expression `operands[0] operators[0] operands[1] ...` with its exact integer answer."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.operators) + 1 or not self.operators:
            raise ValueError(
                f"A problem needs one more operand than operators and at least one operator; got operands "
                f"{self.operands} and operators {self.operators}."
            )
        bad = [op for op in self.operators if op not in OPERATORS]
        if bad:
            raise ValueError(f"Unknown operator(s) {bad}; allowed: {OPERATORS}.")

    @property
    def expression(self) -> str:
        return _join(self.operands, self.operators)

    @property
    def statement(self) -> str:
        """The bare problem, as in a math data set: `Compute 7+5*3-2.`"""
        return f"Compute {self.expression}."

    @property
    def prompt(self) -> str:
        """The user message: the statement, a newline and the paper's instruction to box the final answer."""
        return f"{self.statement}\n{INSTRUCTION}"

    @property
    def answer(self) -> int:
        return solution_steps(self)[-1].result

    @property
    def precedence_matters(self) -> bool:
        """Whether working left to right gives a different answer (then the method is a real choice)."""
        return solution_steps(self, left_to_right=True)[-1].result != self.answer

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.expression.encode()) % HELD_OUT_MODULUS == 0


def _apply(left: int, operator: str, right: int) -> int:
    if operator == "+":
        return left + right
    if operator == "-":
        return left - right
    return left * right


def solution_steps(problem: Problem, left_to_right: bool = False, slips: Sequence[int] | None = None) -> list[Step]:
    """The steps of a trace: `*` first then `+`/`-`, each left to right (or all strictly left to right).

    `slips[i]` is added to the result of step `i` (an arithmetic slip); later steps use the slipped value.
    """
    values = list(problem.operands)
    operators = list(problem.operators)
    steps = []
    while operators:
        if left_to_right or "*" not in operators:
            i = 0
        else:
            i = operators.index("*")
        result = _apply(values[i], operators[i], values[i + 1])
        if slips is not None:
            result += slips[len(steps)]
        left, operator, right = values[i], operators[i], values[i + 1]
        values[i : i + 2] = [result]
        del operators[i]
        steps.append(Step(left, operator, right, result, _join(values, operators)))
    return steps


def _join(values: Sequence[int], operators: Sequence[str]) -> str:
    parts = [str(values[0])]
    for op, value in zip(operators, values[1:]):
        parts += [op, str(value)]
    return "".join(parts)


def format_trace(steps: Sequence[Step]) -> str:
    """One operation per line, then `\\boxed{last result}`: `5*3=15\n7+15=22\n\\boxed{22}`."""
    return "".join(f"{step}\n" for step in steps) + f"{_BOXED}{steps[-1].result}}}"


def reference_trace(problem: Problem) -> str:
    """The correct chain of thought for `problem`."""
    return format_trace(solution_steps(problem))


def imperfect_trace(problem: Problem, rng: random.Random, config: TaskConfig) -> str:
    """A trace by the sloppy student of `config`: sometimes left to right, sometimes a slip (see the module doc)."""
    left_to_right = problem.precedence_matters and rng.random() < config.p_left_to_right
    stop_early = len(problem.operators) >= 3 and rng.random() < config.p_stop_early
    slips = [_slip(rng) if rng.random() < config.p_slip else 0 for _ in problem.operators]
    steps = solution_steps(problem, left_to_right=left_to_right, slips=slips)
    return format_trace(steps[:-1] if stop_early else steps)


def worked_example(problem: Problem) -> str:
    """A "pretraining" document: the statement and its correct trace as plain text, no chat template, no instruction.

    `Compute 7+5*3-2.\\n5*3=15\\n7+15=22\\n22-2=20\\n\\boxed{20}`
    """
    return f"{problem.statement}\n{reference_trace(problem)}"


def _slip(rng: random.Random) -> int:
    return rng.choice((-10, -2, -1, 1, 2, 10))


def sample_problem(rng: random.Random, config: TaskConfig) -> Problem:
    """One problem of `config` (rejection sampling: at most `max_multiplications` `*`, non-negative if asked)."""
    p_other = (1.0 - config.p_multiply) / 2
    while True:
        n = rng.choice(config.num_operators)
        operands = tuple(rng.randint(config.min_operand, config.max_operand) for _ in range(n + 1))
        operators = tuple(rng.choices(OPERATORS, weights=(p_other, p_other, config.p_multiply), k=n))
        if config.max_multiplications is not None and operators.count("*") > config.max_multiplications:
            continue
        problem = Problem(operands, operators)
        if config.allow_negative or all(step.result >= 0 for step in solution_steps(problem)):
            return problem


def sample_problems(n: int, seed: int, config: TaskConfig | None = None, split: str = "train") -> list[Problem]:
    """`n` problems drawn with `random.Random(seed)`, only from `split` ('train', 'held_out' or 'any').

    Deterministic: the same `(n, seed, config, split)` always gives the same list.
    """
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"`split` (={split!r}) must be 'train', 'held_out' or 'any'.")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` (={n!r}) must be a non-negative integer.")
    config = config or TaskConfig()
    rng = random.Random(seed)
    problems: list[Problem] = []
    while len(problems) < n:
        problem = sample_problem(rng, config)
        if split == "any" or problem.held_out == (split == "held_out"):
            problems.append(problem)
    return problems


# ---------------------------------------------------------------------- verifier
def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (balanced braces), or None if there is none / it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def parse_integer(text: str | None) -> int | None:
    """`text` as an integer (surrounding whitespace ignored), or None when it is not exactly one integer."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if _INT.match(text) else None


def verify(completion: str, answer: int | str) -> float:
    """Reward of a completion: 1.0 if its last `\\boxed{}` holds the integer `answer`, else 0.0."""
    predicted = parse_integer(extract_boxed(completion))
    return 1.0 if predicted is not None and predicted == int(answer) else 0.0


def boxed_reward(completions: list[Any], answer: list[int | str], **kwargs: Any) -> list[float]:
    """The verifier as a TRL reward function: `completions` are strings or conversations (lists of messages)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [verify(text, a) for text, a in zip(texts, answer, strict=True)]


def accuracy(completions: Sequence[str], problems: Sequence[Problem]) -> float:
    """Fraction of `completions` the verifier accepts for `problems` (nan for none)."""
    if len(completions) != len(problems):
        raise ValueError(f"Got {len(completions)} completions for {len(problems)} problems.")
    if not problems:
        return math.nan
    return sum(verify(c, p.answer) for c, p in zip(completions, problems)) / len(problems)


def write_problems_jsonl(path: str | os.PathLike, problems: Sequence[Problem], name: str = "toy") -> None:
    """Write `problems` as JSON Lines `{"id", "problem", "answer"}`, the format of `hf_extrapolate.evaluation`."""
    with open(path, "w", encoding="utf-8") as f:
        for i, problem in enumerate(problems):
            row = {"id": f"{name}-{i}", "problem": problem.statement, "answer": str(problem.answer)}
            f.write(json.dumps(row) + "\n")
