"""The paper's evaluation prompt, in the model's chat template or raw (for base models without one)."""

from __future__ import annotations

from typing import Any

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def format_question(problem: str) -> str:
    """`{problem.strip()}\\nPlease reason step by step, and put your final answer within \\boxed{}.` (the paper's
    prompt, built as its reference code builds it: the problem stripped of surrounding whitespace)."""
    return f"{problem.strip()}\n{INSTRUCTION}"


def build_prompt(problem: str, tokenizer: Any = None, *, chat_template: bool = True) -> str:
    """The prompt text for one problem.

    Args:
        problem: the bare problem statement.
        tokenizer: a tokenizer with a `chat_template` (needed only when `chat_template=True`).
        chat_template (`bool`, defaults to `True`): wrap the question as the user turn of the tokenizer's chat template
            with the generation prompt appended; `False` returns the question itself (raw prompting of base models).

    Tokenize the result with `add_special_tokens=False` when `chat_template=True` (the template already holds the
    special tokens it needs).
    """
    question = format_question(problem)
    if not chat_template:
        return question
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "`chat_template=True` needs a tokenizer with a chat template, but "
            f"{type(tokenizer).__name__ if tokenizer is not None else 'no tokenizer'} has none. Pass a chat model's "
            "tokenizer, or use raw prompts (`chat_template=False`, `--no-chat-template` on the command line)."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
