"""Threshold calibration: the tau of a criterion that replaces a target fraction of tokens (the paper's Fig. 2).

At a position with next-token distributions `pi_rl`, `pi_base` the processor redraws with probability
`M(tau) = sum_y p(y) [criterion fires on y]` (the expected replaced mass, `p` the warped proposal; see
`hf_extrapolate.directional.directional_step`). Over a set of positions the replacement ratio is the weighted mean of
`M(tau)`, a monotone step function of tau that `ReplacementStatistics` stores:

- `logp_diff` (fires when `log pi_rl(y) - log pi_base(y) < tau`): a histogram over Delta log p of the proposal mass,
  so `ratio(tau)` is exact at the bin edges and linear between them (bins of 0.005 nats by default, log-spaced down
  to 1e-7 nats around 0, where much of the mass sits when the two models agree);
- position-level criteria (fire on the whole position when the metric `> tau`): the metric of every position, so
  `ratio(tau)` is exact;
- `random`: `ratio(tau) = tau`.

The positions come from text: `calibrate_threshold` samples it from the proposal model on a set of prompts (what the
processor sees when nothing is replaced) and, with `refine_steps > 0`, re-samples with the processor at the
calibrated tau and solves again, since replacing tokens shifts the text a little. Weighting `"sequence"` (default)
averages per-response ratios as the evaluation reports them; `"token"` weighs every generated token equally.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import POSITION_CRITERIA, ExtrapolationConfig
from ..criteria import position_metric
from ..directional import proposal_and_replacement
from .token_metrics import aligned_logprobs

logger = logging.getLogger(__name__)

WEIGHTINGS = ("sequence", "token")
CALIBRATABLE = ("logp_diff", *POSITION_CRITERIA, "random")


def default_edges() -> torch.Tensor:
    """Bin edges of the `logp_diff` histogram: -20 to 20 nats in steps of 0.005, refined around 0 by log-spaced edges
    at +-1e-7 ... +-0.005 (100 per decade), where the two models agree and much of the proposal mass sits."""
    coarse = torch.linspace(-20.0, 20.0, 8001, dtype=torch.float64)
    fine = torch.logspace(-7.0, math.log10(0.005), 471, dtype=torch.float64)
    return torch.unique(torch.cat([coarse, fine, -fine, coarse.new_zeros(1)]))  # sorted


class ReplacementStatistics:
    """The replacement ratio of one criterion as a function of its threshold, over a set of weighted positions.

    Args:
        criterion (`str`): one of `CALIBRATABLE`.
        edges (`torch.Tensor`, *optional*): increasing bin edges for `logp_diff` (default `default_edges()`).
    """

    def __init__(self, criterion: str, edges: torch.Tensor | None = None) -> None:
        if criterion not in CALIBRATABLE:
            raise ValueError(
                f"`criterion` (={criterion!r}) has no threshold to calibrate; calibratable criteria: {CALIBRATABLE} "
                "('always' and 'never' replace 100% and 0% whatever the threshold)."
            )
        self.criterion = criterion
        self.total = 0.0
        self.edges = (default_edges() if edges is None else edges.double().cpu()) if criterion == "logp_diff" else None
        self.mass = torch.zeros(len(self.edges) + 1, dtype=torch.float64) if self.edges is not None else None
        self.values: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def update(
        self, rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor, weights: torch.Tensor, config: ExtrapolationConfig
    ) -> None:
        """Add positions. rl_logprobs, base_logprobs: (N, V) normalised (`normalize_pair`); weights: (N,) >= 0.

        `config` gives the proposal and its warpers (temperature, top-k, top-p) that define `p`.
        """
        weights = weights.double()
        self.total += float(weights.sum())
        if self.criterion == "random":
            return
        if self.criterion == "logp_diff":
            log_p, _ = proposal_and_replacement(rl_logprobs, base_logprobs, config)
            diff = (rl_logprobs - base_logprobs).nan_to_num(nan=0.0)  # NaN: a token masked in both, p = 0 there
            edges = self.edges.to(diff.device, diff.dtype)
            index = torch.bucketize(diff, edges, right=True)  # bin i holds [edges[i-1], edges[i])
            mass = log_p.exp().double() * weights.to(log_p.device).unsqueeze(-1)
            self.mass += torch.bincount(index.flatten(), weights=mass.flatten(), minlength=len(self.mass)).cpu()
            return
        keep = weights > 0
        metric = position_metric(self.criterion, rl_logprobs, base_logprobs)
        self.values.append(metric[keep.to(metric.device)].double().cpu())
        self.weights.append(weights[keep].cpu())

    def merge(self, other: ReplacementStatistics) -> ReplacementStatistics:
        """Add the positions of `other` (same criterion and edges) to these; returns self."""
        if other.criterion != self.criterion:
            raise ValueError(f"Cannot merge statistics of {other.criterion!r} into {self.criterion!r}.")
        self.total += other.total
        if self.mass is not None:
            if not torch.equal(self.edges, other.edges):
                raise ValueError("Cannot merge logp_diff statistics with different bin edges.")
            self.mass += other.mass
        self.values += other.values
        self.weights += other.weights
        return self

    def _check_nonempty(self) -> None:
        if self.total <= 0:
            raise ValueError("No positions were recorded; call update() (or replacement_statistics) on some text first.")

    def _sorted_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct metric values in decreasing order and the weight at each."""
        values, weights = torch.cat(self.values), torch.cat(self.weights)
        levels, inverse = torch.unique(values, return_inverse=True)
        level_weights = torch.zeros_like(levels).index_add_(0, inverse, weights)
        return levels.flip(0), level_weights.flip(0)

    def ratio(self, threshold: float) -> float:
        """The replacement ratio at `threshold` (weighted mean of the expected replaced mass)."""
        self._check_nonempty()
        if self.criterion == "random":
            return float(min(max(threshold, 0.0), 1.0))
        if self.criterion == "logp_diff":
            edges, cum = self.edges, self.mass.cumsum(0) / self.total  # cum[j] = ratio at tau = edges[j]
            tau = min(max(float(threshold), float(edges[0])), float(edges[-1]))
            j = int(torch.searchsorted(edges, torch.tensor([tau], dtype=edges.dtype), right=True)[0])
            if j == 0:
                return float(cum[0])
            if j >= len(edges):
                return float(cum[len(edges) - 1])
            lo, hi = float(edges[j - 1]), float(edges[j])
            frac = (tau - lo) / (hi - lo)
            return float(cum[j - 1] + frac * (cum[j] - cum[j - 1]))
        values, weights = torch.cat(self.values), torch.cat(self.weights)
        return float(weights[values > threshold].sum() / self.total)

    def threshold_for(self, target_ratio: float) -> float:
        """The threshold whose ratio is closest to `target_ratio` (in (0, 1)), e.g. 0.1 for 10% replaced."""
        if not isinstance(target_ratio, (int, float)) or not 0.0 < target_ratio < 1.0:
            raise ValueError(f"`target_ratio` (={target_ratio!r}) must lie in (0, 1), e.g. 0.1 to replace 10%.")
        self._check_nonempty()
        if self.criterion == "random":
            return float(target_ratio)
        if self.criterion == "logp_diff":
            edges, cum = self.edges, self.mass.cumsum(0)[: len(self.edges)] / self.total
            j = int(torch.searchsorted(cum, torch.tensor([target_ratio], dtype=cum.dtype)))  # first cum[j] >= target
            if j == 0 or j >= len(edges):
                logger.warning(
                    "target ratio %.4g lies outside the histogram range [%g, %g] nats; the threshold is clamped.",
                    target_ratio, float(edges[0]), float(edges[-1]),
                )
                return float(edges[min(j, len(edges) - 1)])
            lo, hi = float(cum[j - 1]), float(cum[j])
            return float(edges[j - 1] + (target_ratio - lo) / (hi - lo) * (edges[j] - edges[j - 1]))
        levels, level_weights = self._sorted_levels()
        cum = level_weights.cumsum(0) / self.total  # cum[i] = ratio when levels[:i+1] fire
        # thresholds with exactly levels[:i+1] above them: midpoints, and a little below the lowest level
        below = torch.cat([levels[1:], levels[-1:] - 1e-6 * (1.0 + levels[-1:].abs())])
        candidates = torch.cat([levels[:1], (levels + below) / 2])
        ratios = torch.cat([cum.new_zeros(1), cum])
        best = int((ratios - target_ratio).abs().argmin())
        return float(candidates[best])


def _position_weights(valid: torch.Tensor, weighting: str) -> torch.Tensor:
    """(b, c) bool -> (b, c) weights: 1 per token, or 1 / length per sequence."""
    weights = valid.double()
    if weighting == "sequence":
        weights = weights / valid.sum(-1, keepdim=True).clamp(min=1)
    return weights


def replacement_statistics(
    rl_model: Any,
    base_model: Any,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    config: ExtrapolationConfig,
    *,
    criteria: Sequence[str] | None = None,
    weighting: str = "sequence",
    batch_size: int | None = None,
    chunk_size: int = 256,
    edges: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, ReplacementStatistics]:
    """`ReplacementStatistics` of the generated positions of `sequences`, for every criterion in `criteria`.

    Args:
        sequences, attention_mask, prompt_length: as for `token_metrics` (the response mask is 0 after the end).
        config: the proposal and warpers of the decoding to calibrate (its criterion is the default of `criteria`).
        criteria (*optional*): several criteria from one pass over the models (default `[config.criterion]`).
        weighting (`str`, defaults to `"sequence"`): one of `WEIGHTINGS`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` (={weighting!r}) must be one of {WEIGHTINGS}.")
    criteria = list(criteria) if criteria is not None else [config.criterion]
    stats = {criterion: ReplacementStatistics(criterion, edges) for criterion in criteria}
    # per-row weights need the full row's length: compute them from the whole mask up front
    weights = _position_weights(attention_mask[:, prompt_length:].bool(), weighting)
    for chunk in aligned_logprobs(
        rl_model, base_model, sequences, attention_mask, prompt_length, batch_size=batch_size, chunk_size=chunk_size,
        vocab_size=vocab_size,
    ):
        w = weights[chunk.rows, chunk.columns].reshape(-1).to(chunk.rl.device)
        for s in stats.values():
            s.update(chunk.rl, chunk.base, w, config)
    return stats


def sample_statistics(
    rl_model: Any,
    base_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: ExtrapolationConfig,
    *,
    criteria: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    with_processor: bool = False,
    weighting: str = "sequence",
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    batch_size: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, ReplacementStatistics]:
    """Sample responses to left-padded prompts and return their `replacement_statistics`.

    The responses come from the proposal model of `config` with its warpers (`with_processor=False`), or from the
    processor with `config` itself (`with_processor=True`, to refine a threshold). Uses the global torch RNG.
    Statistics of several prompt batches add up with `ReplacementStatistics.merge`.
    """
    from ..evaluation.generation import GenerationSettings, eos_token_ids, generate_responses
    from ..evaluation.modes import EvalMode

    eos = eos_token_ids(rl_model, base_model) if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    )
    if pad_token_id is None:
        pad_token_id = getattr(rl_model.generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        num_samples=num_samples,
    )
    if with_processor:
        mode = EvalMode("calibration", "directional", config)
    else:
        mode = EvalMode.base() if config.proposal == "base" else EvalMode.rl()
    responses = generate_responses(
        rl_model, base_model, mode, input_ids, attention_mask, settings, eos_token_id=eos, pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    return replacement_statistics(
        rl_model, base_model, responses.sequences, responses.attention_mask(attention_mask), responses.prompt_length,
        config, criteria=criteria, weighting=weighting, batch_size=batch_size, vocab_size=vocab_size,
    )


@dataclass
class Calibration:
    """The result of `calibrate_threshold`: tau, the ratio it gives on the calibration text, and the statistics."""

    criterion: str
    target_ratio: float
    threshold: float
    ratio: float
    statistics: ReplacementStatistics


def _prompt_mask(input_ids: Any, attention_mask: Any, pad_token_id: int | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be a (batch, length) tensor of token ids, got {type(input_ids).__name__}.")
    if attention_mask is None:
        if pad_token_id is not None and bool((input_ids == pad_token_id).any()):
            raise ValueError(f"`attention_mask` is None but `input_ids` holds the pad token {pad_token_id}: pass the "
                             "tokenizer's attention_mask of these prompts.")
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must be a tensor of the shape of `input_ids` {tuple(input_ids.shape)} (or "
                         f"None for unpadded prompts), got {getattr(attention_mask, 'shape', type(attention_mask))}.")
    return attention_mask


def calibrate_threshold(
    rl_model: Any,
    base_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_ratio: float,
    config: ExtrapolationConfig | None = None,
    *,
    criterion: str | None = None,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    refine_steps: int = 0,
    weighting: str = "sequence",
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    batch_size: int | None = None,
    vocab_size: int | None = None,
    seed: int | None = None,
) -> Calibration:
    """The threshold of `criterion` that replaces `target_ratio` of the tokens on responses to these prompts.

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts; `attention_mask=None` means no padding (refused when
            `input_ids` holds `pad_token_id`).
        target_ratio (`float`): the wanted replacement ratio in (0, 1), e.g. 0.1.
        config (`ExtrapolationConfig`, *optional*): proposal, warpers, gamma of the decoding to calibrate.
        criterion (`str`, *optional*): overrides `config.criterion`.
        max_new_tokens, num_samples: the calibration responses sampled per prompt from the proposal model.
        refine_steps (`int`, defaults to 0): re-sample this many times with the processor at the current tau and
            solve again (closer to the ratio the processor will report).
        weighting: `"sequence"` or `"token"` (see the module docstring).
        eos_token_id, pad_token_id (*optional*): default to the models' generation configs.
        seed (`int`, *optional*): seeds torch before each sampling.

    Example:

    ```python
    >>> cal = calibrate_threshold(rl_model, base_model, inputs["input_ids"], inputs["attention_mask"], 0.1,
    ...                           ExtrapolationConfig(criterion="entropy"))
    >>> cal.threshold, cal.ratio   # tau and the ratio it gives on the calibration responses (~0.1)
    ```
    """
    config = config if config is not None else ExtrapolationConfig()
    if criterion is not None:
        config = config.replace(criterion=criterion)
    if config.criterion not in CALIBRATABLE:
        raise ValueError(f"`criterion` (={config.criterion!r}) has no threshold to calibrate; use one of {CALIBRATABLE}.")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"`refine_steps` (={refine_steps!r}) must be a non-negative integer.")
    if not isinstance(target_ratio, (int, float)) or not 0.0 < target_ratio < 1.0:
        raise ValueError(f"`target_ratio` (={target_ratio!r}) must lie in (0, 1), e.g. 0.1 to replace 10%.")
    attention_mask = _prompt_mask(input_ids, attention_mask, pad_token_id)
    threshold = math.nan
    for step in range(refine_steps + 1):
        if seed is not None:
            torch.manual_seed(seed)
        stats = sample_statistics(
            rl_model, base_model, input_ids, attention_mask,
            config if step == 0 else config.replace(threshold=threshold),
            max_new_tokens=max_new_tokens, num_samples=num_samples, with_processor=step > 0, weighting=weighting,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, batch_size=batch_size, vocab_size=vocab_size,
        )[config.criterion]
        threshold = stats.threshold_for(float(target_ratio))
        logger.info("calibration step %d: %s threshold %.5g gives ratio %.4f (target %.4f)", step, config.criterion,
                    threshold, stats.ratio(threshold), target_ratio)
    return Calibration(config.criterion, float(target_ratio), threshold, stats.ratio(threshold), stats)
