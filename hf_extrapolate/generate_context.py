"""What the enclosing `generate()` call looks like from inside a logits processor.

A `LogitsProcessor` is called with `(input_ids, scores)` only, but whether its output is right depends on the
generate call around it: the decoding mode (`do_sample`, `num_beams`), the attention mask of the prompt and the
warpers that transformers applies *after* the processor. transformers (5.x) calls every processor from
`LogitsProcessorList.__call__`, itself called from the decoding loop (`_sample`, `_beam_search`,
`_assisted_decoding`), whose locals hold the resolved `generation_config` and `model_kwargs` (with the attention
mask generate actually uses, already expanded for `num_return_sequences` / `num_beams`). `inspect_generate_call`
reads these from the call stack, once per prefill (never on the per-token fast path).

What it does not do: it changes nothing it finds. When the processor is called outside transformers' loops (a
loop of one's own), it finds nothing and the processor falls back to its own arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation import logits_process as lp

# how many frames above the processor's `__call__` to look (decorators such as torch.no_grad add frames)
MAX_DEPTH = 12

# processors applied after a directional processor would warp its mixture a second time
_WARPERS = tuple(
    getattr(lp, name)
    for name in (
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
        "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper",
    )
    if hasattr(lp, name)
)
# processors that reshape (not only mask) the RL scores before the directional processor: they would change
# log pi_RL but not log pi_base, and so the direction the method reads. Masking processors (-inf) are fine: their
# masks are carried over to the base distribution.
_RESHAPERS = tuple(
    getattr(lp, name)
    for name in (
        "RepetitionPenaltyLogitsProcessor", "EncoderRepetitionPenaltyLogitsProcessor", "SequenceBiasLogitsProcessor",
        "ExponentialDecayLengthPenalty", "UnbatchedClassifierFreeGuidanceLogitsProcessor",
        "ClassifierFreeGuidanceLogitsProcessor", "LogitNormalization",
    )
    if hasattr(lp, name)
) + _WARPERS


@dataclass
class GenerateContext:
    """What was found around a processor call; every field is None when it could not be found."""

    processors: LogitsProcessorList | None = None  # the list the processor is called from
    generation_config: GenerationConfig | None = None  # the resolved config of the generate call
    attention_mask: torch.Tensor | None = None  # (rows, >= length) mask generate uses for the model
    method: str | None = None  # name of the decoding loop (`_sample`, `_beam_search`, ...)

    def after(self, processor: Any) -> list[Any]:
        """The processors that run after `processor` in the list (empty when the list is unknown)."""
        if self.processors is None:
            return []
        for i, p in enumerate(self.processors):
            if p is processor:
                return list(self.processors[i + 1 :])
        return []

    def before(self, processor: Any) -> list[Any]:
        if self.processors is None:
            return []
        out = []
        for p in self.processors:
            if p is processor:
                return out
            out.append(p)
        return []


def inspect_generate_call(processor: Any, max_depth: int = MAX_DEPTH) -> GenerateContext:
    """Find the `LogitsProcessorList` calling `processor` and the decoding loop calling that list. A processor wrapped
    in another object of that list still gets the decoding loop's configuration (`processors` stays None)."""
    ctx = GenerateContext()
    frame = sys._getframe(1)
    depth = 0
    in_list = False  # a LogitsProcessorList was found (the processor may be in it wrapped by the user's own class)
    while frame is not None and depth < max_depth:
        local = frame.f_locals
        if not in_list:
            owner = local.get("self")
            if isinstance(owner, LogitsProcessorList):
                in_list = True
                if any(p is processor for p in owner):
                    ctx.processors = owner
        else:
            gen = local.get("generation_config")
            if isinstance(gen, GenerationConfig):
                ctx.generation_config = gen
                ctx.method = frame.f_code.co_name
                model_kwargs = local.get("model_kwargs")
                if isinstance(model_kwargs, dict):
                    mask = model_kwargs.get("attention_mask")
                    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                        ctx.attention_mask = mask
                break
        frame = frame.f_back
        depth += 1
    del frame
    return ctx


def is_warper(processor: Any) -> bool:
    return isinstance(processor, _WARPERS) and not _is_neutral_warper(processor)


def is_reshaper(processor: Any) -> bool:
    return isinstance(processor, _RESHAPERS) and not _is_neutral_warper(processor)


def _is_neutral_warper(processor: Any) -> bool:
    if isinstance(processor, lp.TemperatureLogitsWarper):
        return processor.temperature == 1.0
    if isinstance(processor, lp.TopKLogitsWarper):
        return processor.top_k <= 0
    if isinstance(processor, lp.TopPLogitsWarper):
        return processor.top_p >= 1.0
    if isinstance(processor, lp.RepetitionPenaltyLogitsProcessor):
        return processor.penalty == 1.0
    return False


def describe(processor: Any) -> str:
    """`TopKLogitsWarper(top_k=50)`: the class with the setting that matters."""
    name = type(processor).__name__
    for attr in ("temperature", "top_k", "top_p", "min_p", "mass", "epsilon", "penalty", "guidance_scale"):
        if hasattr(processor, attr):
            value = getattr(processor, attr)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)):
                return f"{name}({attr}={value})"
    return name
