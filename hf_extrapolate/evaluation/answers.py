"""Final-answer extraction (the last `\\boxed{...}`) and checking with Math-Verify.

`extract_boxed` is pure string processing. `is_correct` parses both sides with Math-Verify
(`pip install math-verify`, imported lazily) and compares them symbolically, so `\\frac12`, `1/2` and `0.5` agree,
intervals keep their open/closed ends, units and `\\text{}` wrappers are dropped. A reference that Math-Verify cannot
parse falls back to comparing whitespace-stripped strings.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

logger = logging.getLogger(__name__)

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


_BARE_ARGUMENT = re.compile(r"[^\s$]+")


def _closing_braces(text: str) -> dict[int, int]:
    """For every `{` in `text` with a matching `}`, the index one past that `}` (one pass; escaped braces `\\{`,
    `\\}` are content)."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            closing[stack.pop()] = i + 1
        i += 1
    return closing


def _box_content(text: str, end_of_command: int, closing: dict[int, int]) -> str | None:
    i = end_of_command
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = closing.get(i)
        return None if close is None else text[i + 1 : close - 1].strip()
    if i > end_of_command:  # `\boxed 5`: the argument runs to the next space or `$`
        match = _BARE_ARGUMENT.match(text, i)
        return match.group(0) if match else None
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped; None without one.

    Nested braces are balanced (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`), escaped braces (`\\{`) are content, and
    `\\boxed 5` (no braces) gives `5`. A box cut off by the token limit is skipped in favour of the one before it.
    Linear in the length of `text` (braces are matched in one pass), however many boxes it has.

    >>> extract_boxed("so x = \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_boxed("no box here") is None
    True
    """
    if not text:
        return None
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    closing = _closing_braces(text)
    for match in reversed(matches):
        content = _box_content(text, match.end(), closing)
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


# Math-Verify bounds its parse and verify with `signal.alarm`, which only works in the main thread. From any other
# thread the check runs in one helper process (its main thread, where the same time bounds hold).
ANSWER_TIMEOUT_S = 5  # Math-Verify's default for parsing and for verifying, each
_POOL: list = []
_POOL_LOCK = threading.Lock()


def _helper_pool():
    with _POOL_LOCK:
        if not _POOL:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _POOL.append(ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")))
        return _POOL[0]


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
    if threading.current_thread() is not threading.main_thread():
        return _is_correct_elsewhere(str(prediction), reference)
    return _check(str(prediction), reference)


@functools.lru_cache(maxsize=65536)
def _is_correct_elsewhere(prediction: str, reference: str) -> bool:
    """`is_correct` from a non-main thread: in the helper process, where Math-Verify's time bounds work."""
    future = _helper_pool().submit(_check, prediction, reference)
    # the helper's own alarms end a long parse or verify (False, as in the main thread); the margin covers the
    # helper's start (imports)
    try:
        return future.result(timeout=2 * ANSWER_TIMEOUT_S + 120)
    except TimeoutError:
        future.cancel()
        logger.warning("Math-Verify did not answer in time for %r vs %r: counted as wrong.", prediction[:80], reference)
        return False


def _check(prediction: str, reference: str) -> bool:
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
    close = _closing_braces(rest).get(0)  # one pass over the tail: linear, like extract_boxed
    return None if close is None else rest[1 : close - 1].strip()


# how a response's final answer is read: `lenient` (default) or the reference's `strict` rule
SCORERS = {"lenient": extract_boxed, "strict": extract_boxed_strict}
