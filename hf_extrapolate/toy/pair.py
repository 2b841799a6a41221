"""Load the toy base/RLVR pair: the one shipped with the package, or one built by `build_toy_pair`.

The shipped pair lives in `hf_extrapolate/toy/assets/pair/{base,rl}` (normal HF model folders with tokenizer and
`toy_pair.json`); `hf-extrapolate toy-pair --out DIR` rebuilds it from scratch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .train import PAIR_INFO_NAME

TOY_PAIR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pair")


def _check_dir(path: str) -> None:
    missing = [d for d in ("base", "rl") if not os.path.isfile(os.path.join(path, d, "config.json"))]
    if missing:
        hint = (
            "The package was installed without its toy assets; build them with `hf-extrapolate toy-pair --out DIR` "
            "and pass `path=DIR`."
            if os.path.abspath(path) == TOY_PAIR_DIR
            else "Build a pair there with `hf-extrapolate toy-pair --out DIR`."
        )
        raise FileNotFoundError(f"No toy pair in {path!r}: missing {', '.join(m + '/' for m in missing)}. {hint}")


def load_toy_pair(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """`(rl_model, base_model, tokenizer)` of a toy pair, in eval mode.

    Args:
        path (`str` or `os.PathLike`, *optional*): a folder holding `base/` and `rl/`; defaults to the shipped pair.
        device (`str` or `torch.device`, *optional*): where to put both models (default: CPU).
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of both models.

    ```python
    >>> from hf_extrapolate.toy import Problem, load_toy_pair
    >>> rl_model, base_model, tokenizer = load_toy_pair()
    >>> problem = Problem((3, 4, 2, 5), ("+", "*", "-"))  # problem.prompt: "Compute 3+4*2-5.\\nPlease reason ..."
    >>> inputs = tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}],
    ...                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    >>> for model in (base_model, rl_model):
    ...     out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    ...     print(repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
    '4*2=8\\n3+8=11\\n\\\\boxed{11}'
    '4*2=8\\n3+8=11\\n11-5=6\\n\\\\boxed{6}'
    ```
    """
    path = os.fspath(path) if path is not None else TOY_PAIR_DIR
    _check_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "rl"))
    models = []
    for role in ("rl", "base"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(path, role), dtype=dtype)
        if device is not None:
            model = model.to(device)
        models.append(model.eval())
    return models[0], models[1], tokenizer


def toy_pair_info(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The `toy_pair.json` of both models: `{"base": {...}, "rl": {...}}` (config, accuracies, build time)."""
    path = os.fspath(path) if path is not None else TOY_PAIR_DIR
    _check_dir(path)
    info = {}
    for role in ("base", "rl"):
        with open(os.path.join(path, role, PAIR_INFO_NAME), encoding="utf-8") as f:
            info[role] = json.load(f)
    return info
