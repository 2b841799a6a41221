"""Batched sampling for evaluation: left-padded prompts in, responses and replacement ratios out.

Every mode is sampled with the same explicit settings. The models' own `generation_config` sampling defaults
(top-k 50, repetition penalty, min-p, ...) are overridden with neutral values, so that base, RL and directional decoding
differ only in the distribution they sample from. For directional modes the user's temperature / top-k / top-p go into
the `ExtrapolationConfig` (applied per component inside the processor) and generate's own warpers stay neutral.

`TransformersEngine` is the runner's default engine (transformers' `generate`, one unit at a time); the vLLM engine
(`hf_extrapolate.vllm.evaluation.VllmEngine`) has the same interface. This module does no answer checking and no file
handling: see `hf_extrapolate.evaluation.runner`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..reference import model_device
from ..statistics import generated_mask
from .modes import EvalMode

logger = logging.getLogger(__name__)

# generate() knobs that a checkpoint's generation_config.json may set and that would make modes differ
_NEUTRAL = {"repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0}


@dataclass
class GenerationSettings:
    """How every mode of a run samples, and how the run is batched and seeded.

    Args:
        max_new_tokens (`int`, defaults to 1024): response length limit.
        temperature (`float`, defaults to 1.0): 0 means greedy decoding.
        top_p (`float`, defaults to 1.0), top_k (`int`, defaults to 0): nucleus / top-k truncation (1.0 / 0 disable).
        num_samples (`int`, defaults to 1): samples per problem (the k of Avg@k; Pass@k is reported up to it).
        seed (`int`, defaults to 0): every batch is seeded from (seed, data set, batch index), the same in every mode.
        batch_size (`int`, defaults to 8): problems per `generate` call (each with `num_samples` sequences).
        chat_template (`bool`, defaults to True): wrap the prompt in the tokenizer's chat template.
    """

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8
    chat_template: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` (={value!r}) must be a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` (={self.seed!r}) must be a non-negative integer.")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"`temperature` (={self.temperature!r}) must be a float >= 0; 0 means greedy decoding.")
        self.temperature = float(self.temperature)
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` (={self.top_p!r}) must be a float in (0, 1]; 1.0 disables top-p.")
        self.top_p = float(self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` (={self.top_k!r}) must be a non-negative integer; 0 disables top-k.")
        if self.temperature == 0 and self.num_samples > 1:
            logger.warning("temperature=0 (greedy) with num_samples=%d: all samples of a problem are identical.",
                           self.num_samples)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def record_fields(self) -> dict[str, Any]:
        """The settings stored with every result record (a resumed run must match them)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "chat_template": self.chat_template,
        }


@dataclass
class Responses:
    """The output of one batched `generate` call.

    sequences: (R, T) prompt + response ids (R = prompts x samples, sample-major within a prompt);
    response_mask: (R, T - prompt_length) bool, True up to and including the first end-of-sequence token;
    replace_ratio: (R,) float, the expected replaced fraction per response (0 for `base`, 1 for `rl`).
    """

    sequences: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    replace_ratio: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def attention_mask(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(R, T): the repeated prompt mask followed by the response mask (0 after the end of sequence)."""
        rows = self.sequences.shape[0] // prompt_mask.shape[0]
        prompt = prompt_mask.to(self.sequences.device).repeat_interleave(rows, dim=0)
        return torch.cat([prompt.long(), self.response_mask.long()], dim=1)


def eos_token_ids(*sources: Any) -> list[int]:
    """The union of end-of-sequence ids of tokenizers, models and generation configs (ints, lists or None)."""
    ids: list[int] = []
    for source in sources:
        for obj in (source, getattr(source, "generation_config", None)):
            value = getattr(obj, "eos_token_id", None) if obj is not None else None
            for token in [value] if isinstance(value, int) else list(value or []):
                if token is not None and int(token) not in ids:
                    ids.append(int(token))
    return ids


def left_pad(token_lists: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad lists of ids: returns `(input_ids, attention_mask)`, both (B, max length) long."""
    if not token_lists or any(len(ids) == 0 for ids in token_lists):
        raise ValueError("Every prompt must have at least one token; got an empty prompt.")
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool) -> list[list[int]]:
    """Tokenize prompt texts (no special tokens added to chat-templated text): one list of ids per prompt."""
    return [list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"]) for text in prompts]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool, pad_token_id: int):
    """Tokenize prompt texts (no special tokens added to chat-templated text) and left-pad them."""
    return left_pad(tokenize_prompts(tokenizer, prompts, chat_template=chat_template), pad_token_id)


def _sampling_kwargs(model: Any, *, do_sample: bool, temperature: float, top_k: int, top_p: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(_NEUTRAL, do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    if getattr(getattr(model, "generation_config", None), "min_p", None) is not None:
        kwargs["min_p"] = 0.0
    return kwargs


@torch.inference_mode()
def generate_responses(
    rl_model: Any,
    base_model: Any,
    mode: EvalMode,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    *,
    eos_token_id: Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
) -> Responses:
    """Sample `settings.num_samples` responses per left-padded prompt with `mode`. Uses the global torch RNG.

    `eos_token_id` ends a response (for every mode alike); `vocab_size` (the tokenizer's length) is passed to the
    processor when the two models' embedding matrices are padded differently.
    """
    common = dict(
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=settings.num_samples,
        eos_token_id=list(eos_token_id),
        pad_token_id=pad_token_id,
    )
    prompt_length = input_ids.shape[1]
    processor = None
    if mode.kind == "directional":
        from transformers import LogitsProcessorList

        from ..processor import DirectionalLogitsProcessor

        config = mode.config
        if settings.do_sample:
            config = config.replace(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        model = rl_model
        device = model_device(model)
        processor = DirectionalLogitsProcessor(
            base_model, config, attention_mask=attention_mask.to(device), do_sample=settings.do_sample,
            eos_token_id=list(eos_token_id), vocab_size=vocab_size,
        )
        kwargs = _sampling_kwargs(model, do_sample=settings.do_sample, temperature=1.0, top_k=0, top_p=1.0)
        kwargs["logits_processor"] = LogitsProcessorList([processor])
    else:
        model = base_model if mode.kind == "base" else rl_model
        device = model_device(model)
        kwargs = _sampling_kwargs(
            model, do_sample=settings.do_sample, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p,
        )
    sequences = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **common, **kwargs
    )
    response_mask = generated_mask(sequences, prompt_length, list(eos_token_id))
    if processor is not None:
        ratio = processor.replace_ratio(sequences).float()
    else:
        ratio = torch.full((sequences.shape[0],), 0.0 if mode.kind == "base" else 1.0)
    return Responses(sequences, prompt_length, response_mask, ratio.to(sequences.device))


@dataclass
class UnitRequest:
    """What the runner asks an engine for: `num_samples` responses per prompt of one batch, in one mode.

    prompts: the prompts' token ids (not padded); seed: the unit's seed (`runner.batch_seed`, the same in every mode).
    """

    mode: EvalMode
    prompts: list[list[int]]
    seed: int


class TransformersEngine:
    """The runner's default engine: the two transformers models, transformers' `generate`, one unit per call (the
    global torch RNG seeded with the unit's seed, then `generate_responses` on the left-padded batch)."""

    name = "transformers"
    serves_modes_together = False  # the runner sends one unit per `generate` call

    def __init__(self, rl_model: Any, base_model: Any, vocab_size: int | None = None):
        self.rl_model, self.base_model, self.vocab_size = rl_model, base_model, vocab_size

    @property
    def eos_sources(self) -> tuple[Any, ...]:
        """Objects whose `eos_token_id` / `generation_config.eos_token_id` end a response (see `eos_token_ids`)."""
        return (self.rl_model, self.base_model)

    def check(self, modes: Sequence[EvalMode], settings: GenerationSettings) -> None:
        """Raise `ValueError` naming a mode this engine cannot run (every mode runs here)."""

    def generate(
        self, requests: Sequence[UnitRequest], settings: GenerationSettings, *, eos_token_id: Sequence[int],
        pad_token_id: int,
    ) -> list[Responses]:
        out = []
        for request in requests:
            input_ids, attention_mask = left_pad(request.prompts, pad_token_id)
            torch.manual_seed(request.seed)
            out.append(generate_responses(
                self.rl_model, self.base_model, request.mode, input_ids, attention_mask, settings,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=self.vocab_size,
            ))
        return out
