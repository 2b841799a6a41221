"""The step distribution of selective replacement / extrapolation, as pure functions on `(B, V)` tensors.

Notation (all over the full vocabulary, fp32): `l_rl`, `l_b` the raw next-token log-probs of the RL and the base
model, `D(y) = l_rl(y) - l_b(y)`.

- proposal   `p = warp(l_proposal)`, `proposal` in {"base", "rl"};
- replacement `r = warp((1 + gamma) l_rl - gamma l_b)` (Eq. 7), optionally restricted to the proposal's top-k raw
  tokens (`candidate_top_k`) before warping;
- criterion  `c(y)` (see `hf_extrapolate.criteria`);
- sampling: "draw y ~ p; if c fires on y, redraw from r" has the marginal
  `q(y) = p(y) [c(y) does not fire] + M r(y)`, `M = sum_y' p(y') [c(y') fires]` (for `random`: `q = (1-t) p + t r`);
- greedy: `y0 = argmax p`; if c fires on y0 the token is `argmax r`, else `y0`.

Tokens that are `-inf` in the RL scores (masked by an upstream processor: bad words, min length, ...) are masked in
the base distribution too, and both are renormalised on the allowed tokens; with nothing masked this is the raw
distribution. This module does not know about caches, batching or `generate()`: see `hf_extrapolate.processor`.
"""

from __future__ import annotations

import math

import torch

from .config import ExtrapolationConfig
from .criteria import fires
from .distributions import NEG_INF, extrapolated_logits, warp_logprobs

FP32_MIN = torch.finfo(torch.float32).min


def normalize_pair(rl_scores: torch.Tensor, base_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax both score tensors in fp32, masking in the base every token that is `-inf` in the RL scores.

    rl_scores, base_scores: (B, V) logits or log-probs. Returns `(l_rl, l_b)`, both (B, V).
    """
    if rl_scores.shape != base_scores.shape:
        raise ValueError(
            f"RL scores {tuple(rl_scores.shape)} and base scores {tuple(base_scores.shape)} must have the same "
            "(batch, vocab) shape; align padded vocabularies first (the processor does this for you)."
        )
    rl = torch.log_softmax(rl_scores.float(), dim=-1)
    # 0 where the RL log-prob is finite, -inf where it is -inf: an additive mask in two cheap elementwise passes
    # (on CPU a boolean `where` / `masked_fill` over (B, V) costs several times more)
    masked = rl - rl.clamp(min=FP32_MIN)
    base = torch.log_softmax(base_scores.float() + masked, dim=-1)
    return rl, base


def proposal_and_replacement(
    rl: torch.Tensor, base: torch.Tensor, config: ExtrapolationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log p, log r)` from normalised `(l_rl, l_b)`, each (B, V)."""
    proposal_raw = base if config.proposal == "base" else rl
    log_p = warp_logprobs(proposal_raw, config.temperature, config.top_k, config.top_p, normalized=True)
    ext = extrapolated_logits(rl, base, config.gamma)
    if config.candidate_top_k is not None:
        k = min(config.candidate_top_k, proposal_raw.shape[-1])
        keep = torch.zeros_like(ext, dtype=torch.bool).scatter(-1, proposal_raw.topk(k, dim=-1).indices, True)
        ext = ext.masked_fill(~keep, NEG_INF)
    log_r = warp_logprobs(ext, config.temperature, config.top_k, config.top_p, normalized=ext is rl)
    return log_p, log_r


def directional_step(
    rl_scores: torch.Tensor,
    base_scores: torch.Tensor,
    config: ExtrapolationConfig,
    *,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 1 / Eq. 7: `(scores, replaced_mass)`; see `directional_step_with_replacement`."""
    out, mass, _ = directional_step_with_replacement(
        rl_scores, base_scores, config, greedy=greedy, generator=generator
    )
    return out, mass


def directional_step_with_replacement(
    rl_scores: torch.Tensor,
    base_scores: torch.Tensor,
    config: ExtrapolationConfig,
    *,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Algorithm 1 / Eq. 7. rl_scores, base_scores: (B, V). Returns `(scores, replaced_mass, log_r)`.

    - `greedy=False`: `scores = log q` (B, V), so that sampling from `softmax(scores)` is exactly the two-stage
      sampler; `replaced_mass = M` (B,), the probability that the drawn token is a redraw.
    - `greedy=True`: `scores` is `log r` on rows where the criterion fires on `y0 = argmax p` and `log p` elsewhere,
      so `argmax(scores)` is the greedy choice; `replaced_mass` is 1.0 on replaced rows, 0.0 elsewhere.
      `random` draws one uniform per row from `generator` (torch's global RNG when None).
    - `log_r` (B, V) is the replacement distribution (for the posterior `M r(y) / q(y)` of a drawn token).
    """
    rl, base = normalize_pair(rl_scores, base_scores)
    log_p, log_r = proposal_and_replacement(rl, base, config)
    criterion, tau = config.criterion, config.threshold
    rows = rl.shape[0]

    if greedy:
        if criterion == "random":
            fire = torch.rand(rows, device=rl.device, generator=generator) < tau
        elif criterion == "logp_diff":  # only the greedy token's difference matters: gather, no (B, V) mask
            y0 = log_p.argmax(dim=-1, keepdim=True)
            fire = fires(criterion, tau, rl.gather(-1, y0), base.gather(-1, y0)).squeeze(-1)
        else:
            fire = fires(criterion, tau, rl, base).squeeze(-1)
        return torch.where(fire.unsqueeze(-1), log_r, log_p), fire.float(), log_r

    if criterion == "random":
        keep = math.log1p(-tau) if tau < 1.0 else NEG_INF
        swap = math.log(tau) if tau > 0.0 else NEG_INF
        log_q = torch.logaddexp(log_p + keep, log_r + swap)
        return log_q, torch.full((rows,), tau, device=rl.device), log_r

    mask = fires(criterion, tau, rl, base)
    if mask.shape[-1] == 1:  # position-level: the whole row is redrawn (M = 1) or kept (M = 0)
        return torch.where(mask, log_r, log_p), mask.squeeze(-1).float(), log_r
    mass = (log_p.exp() * mask).sum(-1)
    log_q = torch.logaddexp(torch.where(mask, NEG_INF, log_p), mass.log().unsqueeze(-1) + log_r)
    return log_q, mass, log_r


def directional_logprobs(
    rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor, config: ExtrapolationConfig | None = None, **overrides
) -> torch.Tensor:
    """The log-probabilities `log q` of the sampling step distribution. (B, V), (B, V) -> (B, V).

    Args:
        rl_logprobs: next-token log-probs (or logits) of the RL model.
        base_logprobs: next-token log-probs (or logits) of the base model, same shape.
        config: an `ExtrapolationConfig`; keyword `overrides` (e.g. `gamma=0.1`) replace its fields.

    Example:

    ```python
    >>> import torch
    >>> from hf_extrapolate import ExtrapolationConfig, directional_logprobs
    >>> rl, base = torch.randn(2, 8).log_softmax(-1), torch.randn(2, 8).log_softmax(-1)
    >>> log_q = directional_logprobs(rl, base, ExtrapolationConfig(criterion="always"))  # = rl, gamma 0
    >>> torch.testing.assert_close(log_q, rl)
    ```
    """
    config = config if config is not None else ExtrapolationConfig()
    if overrides:
        config = config.replace(**overrides)
    return directional_step(rl_logprobs, base_logprobs, config, greedy=False)[0]
