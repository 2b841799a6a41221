"""Teacher-forced token metrics: how the RL model and its base differ on given text (the paper's Fig. 1b, 12-15).

For every generated token `y_t` of a left-padded batch, with `pi_rl`, `pi_base` the next-token distributions of the
two models at that position (raw: temperature 1, full vocabulary):

- `rl_logprob`, `base_logprob`: `log pi_rl(y_t)`, `log pi_base(y_t)`; `logp_diff`: their difference (Delta log p);
- `base_entropy`, `rl_entropy`: `H(pi_base)`, `H(pi_rl)`;
- `kl`: `KL(pi_rl || pi_base)`; `reverse_kl`: `KL(pi_base || pi_rl)`; `avg_kl`: their mean.

The math is `hf_extrapolate.criteria.position_metric` on `hf_extrapolate.directional.normalize_pair`, the same
functions the processor decides with. Each model runs one forward per chunk of `batch_size` sequences (never one per
token), with generate's position ids (`cumsum(mask) - 1`); the full-vocabulary math runs `chunk_size` positions at a
time to bound memory. When the two vocabularies differ in size (padded embedding matrices) the logits are cut to the
shared size exactly as the processor does (`shared_vocab_size`). This module does not generate text: see
`hf_extrapolate.evaluation.generate_responses`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..criteria import position_metric
from ..directional import normalize_pair
from ..processor import shared_vocab_size
from ..reference import model_device

logger = logging.getLogger(__name__)

METRICS = ("logp_diff", "rl_logprob", "base_logprob", "base_entropy", "rl_entropy", "kl", "reverse_kl", "avg_kl")


def _forward_parameters(model: Any) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _next_token_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logits predicting the last `n` columns: (b, n, V), from one forward."""
    device = model_device(model)
    ids, mask = input_ids.to(device), attention_mask.to(device).long()
    params = _forward_parameters(model)
    kwargs: dict[str, Any] = {"use_cache": False}
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = n + 1
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return logits[:, -(n + 1) : -1]


@dataclass
class AlignedChunk:
    """Normalised log-probs of both models at a block of generated positions.

    rows, columns: slices of the (B, T - prompt_length) output grid; rl, base: (b * c, V) fp32 log-probs;
    tokens: (b * c,) the token at each position; valid: (b * c,) bool, the attention mask there.
    """

    rows: slice
    columns: slice
    rl: torch.Tensor
    base: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor


def _check_inputs(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> None:
    if sequences.dim() != 2:
        raise ValueError(f"`sequences` must be (batch, length) token ids, got shape {tuple(sequences.shape)}.")
    if attention_mask.shape != sequences.shape:
        raise ValueError(
            f"`attention_mask` {tuple(attention_mask.shape)} must have the shape of `sequences` "
            f"{tuple(sequences.shape)}: the prompt mask followed by the response mask."
        )
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 1 <= prompt_length < sequences.shape[1]:
        raise ValueError(
            f"`prompt_length` (={prompt_length!r}) must be an int in [1, {sequences.shape[1] - 1}]: the column where "
            "the generated part starts (at least one prompt token precedes it)."
        )


def _embedding_rows(model: Any) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def _check_token_ids(sequences: torch.Tensor, rl_model: Any, base_model: Any) -> None:
    """Ids outside both embedding matrices fail inside torch (an index error, or a device assert): say so first."""
    if sequences.numel() == 0:
        return
    low, high = int(sequences.min()), int(sequences.max())
    sizes = [n for n in (_embedding_rows(rl_model), _embedding_rows(base_model)) if n is not None]
    if low < 0 or (sizes and high >= min(sizes)):
        bad = low if low < 0 else high
        raise ValueError(
            f"`sequences` holds token id {bad}, outside the models' vocabulary [0, {min(sizes) if sizes else '?'}): "
            "pass token ids from the tokenizer the two models share (padding included)."
        )


def aligned_logprobs(
    rl_model: Any,
    base_model: Any,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    *,
    batch_size: int | None = None,
    chunk_size: int = 256,
    vocab_size: int | None = None,
) -> Iterator[AlignedChunk]:
    """Yield `AlignedChunk`s covering the generated part of `sequences`, one forward per model per row chunk."""
    _check_inputs(sequences, attention_mask, prompt_length)
    for model, name in ((rl_model, "rl_model"), (base_model, "base_model")):
        if getattr(model, "training", False):
            logger.warning("%s is in training mode (dropout on); call .eval() for exact metrics.", name)
    for value, name in ((chunk_size, "chunk_size"), (batch_size, "batch_size")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` (={value!r}) must be a positive integer" +
                             (" or None (all sequences in one forward)." if name == "batch_size" else "."))
    _check_token_ids(sequences, rl_model, base_model)
    rows_total, width = sequences.shape
    n = width - prompt_length
    batch_size = batch_size or rows_total
    for start in range(0, rows_total, batch_size):
        rows = slice(start, min(start + batch_size, rows_total))
        ids, mask = sequences[rows], attention_mask[rows]
        with torch.inference_mode():
            rl_logits = _next_token_logits(rl_model, ids, mask, n)
            base_logits = _next_token_logits(base_model, ids, mask, n).to(rl_logits.device)
        vocab = shared_vocab_size(rl_logits.shape[-1], base_logits.shape[-1], vocab_size)
        gen_ids = ids[:, prompt_length:].to(rl_logits.device)
        if int(gen_ids.max()) >= vocab:
            raise ValueError(
                f"`sequences` holds token id {int(gen_ids.max())} but the models share only {vocab} vocabulary "
                "entries; the two models must use the same tokenizer."
            )
        gen_mask = mask[:, prompt_length:].to(rl_logits.device).bool()
        for c0 in range(0, n, chunk_size):
            columns = slice(c0, min(c0 + chunk_size, n))
            rl, base = normalize_pair(
                rl_logits[:, columns, :vocab].reshape(-1, vocab), base_logits[:, columns, :vocab].reshape(-1, vocab)
            )
            yield AlignedChunk(rows, columns, rl, base, gen_ids[:, columns].reshape(-1), gen_mask[:, columns].reshape(-1))


def token_metrics(
    rl_model: Any,
    base_model: Any,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    *,
    batch_size: int | None = None,
    chunk_size: int = 256,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher-forced metrics of the generated tokens of a left-padded batch.

    Args:
        rl_model, base_model: causal LMs sharing a tokenizer (either may have generated `sequences`).
        sequences: (B, T) ids, the prompt (left-padded) in columns `[0, prompt_length)` and the generated part after.
        attention_mask: (B, T) the prompt mask followed by the response mask (0 on padding after the end of
            sequence; `Responses.attention_mask` builds it).
        prompt_length: the column where the generated part starts.
        batch_size (`int`, *optional*): sequences per forward (all at once by default).
        chunk_size (`int`, defaults to 256): positions per block of full-vocabulary math.
        vocab_size (`int`, *optional*): `len(tokenizer)`, when the embedding matrices are padded by more than 1%.

    Returns:
        `{name: (B, T - prompt_length) float32}` for every name in `METRICS`, on `sequences.device`; NaN where the
        attention mask is 0.

    Example:

    ```python
    >>> out = rl_model.generate(**inputs, do_sample=True, max_new_tokens=64)
    >>> mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1]:])], 1)
    >>> m = token_metrics(rl_model, base_model, out, mask, inputs["input_ids"].shape[1])
    >>> m["logp_diff"].nanmean(), m["kl"].nanmean()
    ```
    """
    rows, width = sequences.shape
    n = width - prompt_length if 1 <= prompt_length < width else 0
    out = {name: torch.full((rows, n), float("nan"), device=sequences.device) for name in METRICS}
    for chunk in aligned_logprobs(
        rl_model, base_model, sequences, attention_mask, prompt_length, batch_size=batch_size, chunk_size=chunk_size,
        vocab_size=vocab_size,
    ):
        token = chunk.tokens.unsqueeze(-1)
        rl_lp = chunk.rl.gather(-1, token).squeeze(-1)
        base_lp = chunk.base.gather(-1, token).squeeze(-1)
        kl = position_metric("kl", chunk.rl, chunk.base)
        reverse_kl = position_metric("reverse_kl", chunk.rl, chunk.base)
        values = {
            "logp_diff": rl_lp - base_lp,
            "rl_logprob": rl_lp,
            "base_logprob": base_lp,
            "base_entropy": position_metric("entropy", chunk.rl, chunk.base),
            "rl_entropy": position_metric("rl_entropy", chunk.rl, chunk.base),
            "kl": kl,
            "reverse_kl": reverse_kl,
            "avg_kl": 0.5 * (kl + reverse_kl),
        }
        shape = (chunk.rows.stop - chunk.rows.start, chunk.columns.stop - chunk.columns.start)
        for name, value in values.items():
            value = value.masked_fill(~chunk.valid, float("nan")).reshape(shape)
            out[name][chunk.rows, chunk.columns] = value.to(sequences.device)
    return out
