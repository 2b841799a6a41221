"""Math problem sets as JSON Lines: one `{"problem": ..., "answer": ...}` object per line.

The files the paper evaluates on (AIME-24/25, AMC-23, MATH-500, Minerva, GSM8K) come in this form
(`examples/data/` in the repository holds the first 8 problems of each); any user file with the two keys works too.
Optional keys: `id` (defaults to `<dataset>-<line>`), `source`. `answer` must be a non-empty string (or a number);
`problem` a non-empty string. This module only reads; it does not download or cache data sets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem of a data set: the bare statement, the reference final answer and where it comes from."""

    dataset: str
    problem_id: str
    index: int  # line number among the problems of its data set (0-based)
    problem: str
    answer: str


def dataset_name(path: str | os.PathLike) -> str:
    """The data set name of a file: its name without `.jsonl` (`examples/data/aime24.jsonl` -> `aime24`)."""
    name = Path(path).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(path).stem


def load_problems(path: str | os.PathLike, *, limit: int | None = None, name: str | None = None) -> list[Problem]:
    """Read a JSON Lines file of problems. Blank lines are skipped.

    Args:
        path: the `.jsonl` file.
        limit (`int`, *optional*): keep only the first `limit` problems (a quick run).
        name (`str`, *optional*): the data set name recorded with each problem; defaults to the file name without
            `.jsonl`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` (={limit!r}) must be a positive integer or None (all problems).")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Problem file {str(path)!r} does not exist. Pass a JSON Lines file with 'problem' and 'answer' keys, "
            "e.g. examples/data/aime24.jsonl."
        )
    name = name or dataset_name(path)
    problems: list[Problem] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); save the file as UTF-8.") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({err.msg}); each line must be one object.") from err
        missing = [key for key in ("problem", "answer") if key not in row] if isinstance(row, dict) else ["problem"]
        if missing:
            raise ValueError(
                f"{path}:{line_no} lacks {missing}; each line must be an object with 'problem' and 'answer' "
                "(and optionally 'id')."
            )
        index = len(problems)
        problem_id = str(row.get("id", f"{name}-{index}"))
        if problem_id in seen:
            raise ValueError(f"{path}:{line_no} repeats id {problem_id!r}; problem ids must be unique in a file.")
        seen.add(problem_id)
        problem, answer = row["problem"], _answer_text(row["answer"], f"{path}:{line_no}")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{path}:{line_no}: 'problem' (={problem!r}) must be a non-empty string.")
        problems.append(Problem(name, problem_id, index, problem, answer))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{path} holds no problems; expected one JSON object per line.")
    return problems


def _answer_text(answer: object, where: str) -> str:
    """The reference answer as text: a non-empty string, or a number (`2` -> `"2"`); anything else is an error
    (`null` would become the answer "None", a list "['2', '3']")."""
    if isinstance(answer, str) and answer.strip():
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    raise ValueError(f"{where}: 'answer' (={answer!r}) must be a non-empty string (or a number); "
                     "one reference final answer per problem, e.g. \"\\\\frac{1}{2}\".")


def load_datasets(paths: list[str | os.PathLike], *, limit: int | None = None) -> list[Problem]:
    """`load_problems` of several files, concatenated in order; two files with the same name are an error."""
    problems: list[Problem] = []
    names: dict[str, str] = {}
    for path in paths:
        name = dataset_name(path)
        if name in names:
            raise ValueError(
                f"Data sets {names[name]!r} and {str(path)!r} have the same name {name!r}; rename one of the files."
            )
        names[name] = str(path)
        problems.extend(load_problems(path, limit=limit, name=name))
    return problems
