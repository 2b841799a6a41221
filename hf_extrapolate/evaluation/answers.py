"""Final-answer extraction (the last `\\boxed{...}`) and checking with Math-Verify.

`extract_boxed` is pure string processing. `is_correct` parses both sides with Math-Verify
(`pip install math-verify`, imported lazily) and compares them symbolically, so `\\frac12`, `1/2` and `0.5` agree,
intervals keep their open/closed ends, units and `\\text{}` wrappers are dropped. A reference that Math-Verify cannot
parse falls back to comparing whitespace-stripped strings.
"""

from __future__ import annotations

import functools
import re

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> int | None:
    """Index one past the `}` closing the `{` at `start`, skipping escaped braces; None when unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_content(text: str, end_of_command: int) -> str | None:
    i = end_of_command
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _braced(text, i)
        return None if close is None else text[i + 1 : close - 1].strip()
    if i > end_of_command:  # `\boxed 5`: the argument runs to the next space or `$`
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped; None without one.

    Nested braces are balanced (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`), escaped braces (`\\{`) are content, and
    `\\boxed 5` (no braces) gives `5`. A box cut off by the token limit is skipped in favour of the one before it.

    >>> extract_boxed("so x = \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_boxed("no box here") is None
    True
    """
    if not text:
        return None
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None:
            return content
    return None


def _math_verify():
    try:
        import math_verify
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Answer checking needs Math-Verify: `pip install math-verify` (or `pip install hf_extrapolate[eval]`)."
        ) from err
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple:
    return tuple(_math_verify().parse(f"${reference}$"))


@functools.lru_cache(maxsize=65536)
def _parse_prediction(prediction: str) -> tuple:
    return tuple(_math_verify().parse(f"\\boxed{{{prediction}}}"))


def is_correct(prediction: str | None, reference: str) -> bool:
    """Whether the extracted `prediction` is mathematically equal to the `reference` answer (Math-Verify).

    `None` or an empty prediction is wrong. The comparison is Math-Verify's `verify(gold, target)` (gold = reference),
    which is not symmetric for every kind of answer (sets against intervals, for instance).

    >>> is_correct("\\\\frac12", "0.5")
    True
    """
    if prediction is None or not str(prediction).strip():
        return False
    if not isinstance(reference, str):
        raise TypeError(f"`reference` (={reference!r}) must be the reference answer as a string, e.g. '\\\\frac{{1}}{{2}}'.")
    gold = _parse_reference(reference)
    target = _parse_prediction(str(prediction))
    if not gold or not target:
        return "".join(str(prediction).split()) == "".join(reference.split())
    return bool(_math_verify().verify(list(gold), list(target)))


def extract_boxed_strict(text: str | None) -> str | None:
    """The paper's reference rule: only the text after the *last* `\\boxed` counts; its braced argument, stripped.

    Unlike `extract_boxed`, a last box cut off by the token limit (or without braces) gives None instead of falling
    back to an earlier box, and `\\fbox` is not read.

    >>> extract_boxed_strict("\\\\boxed{1} then \\\\boxed{2")  # the last box is unfinished
    >>> extract_boxed("\\\\boxed{1} then \\\\boxed{2")
    '1'
    """
    if not text:
        return None
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed") :]
    if not rest.startswith("{"):
        return None
    close = _braced(rest, 0)
    return None if close is None else rest[1 : close - 1].strip()


# how a response's final answer is read: `lenient` (default) or the reference's `strict` rule
SCORERS = {"lenient": extract_boxed, "strict": extract_boxed_strict}
