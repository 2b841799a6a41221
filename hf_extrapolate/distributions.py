"""Pure tensor functions on next-token distributions: entropy, KL, warping, extrapolation.

All functions take log-probabilities of shape `(B, V)` (rows are positions, columns the vocabulary) and never modify
their inputs. `-inf` marks a token with probability zero; `0 * log 0` is taken as 0, so masked tokens never produce
NaN. Warping reuses transformers' own warpers so that temperature / top-k / top-p mean exactly what they mean in
`generate()`.
"""

from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

NEG_INF = float("-inf")
# log of the smallest positive normal float32: the floor for a base log-prob that underflowed to -inf
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy `-sum_y p(y) log p(y)` in nats. logprobs: (..., V). Returns (...)."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y)) in nats. logp, logq: (..., V). Returns (...).

    Terms with p(y) = 0 are 0; a token with p(y) > 0 and q(y) = 0 makes the divergence `inf`.
    """
    p = logp.exp()
    terms = p * (logp - logq)
    return terms.masked_fill(p == 0, 0.0).sum(-1)


def warp_logprobs(logprobs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p with transformers' semantics and renormalise.

    logprobs: (B, V) log-probabilities or logits. Returns (B, V) log-probabilities; removed tokens are `-inf`, at
    least one token is kept.
    """
    scores = logprobs
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k and top_k > 0:
        scores = TopKLogitsWarper(top_k=int(top_k))(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=float(top_p))(None, scores)
    return torch.log_softmax(scores, dim=-1)


def extrapolated_logits(rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Unnormalised log of Eq. 7, `(1 + gamma) * logp_rl - gamma * logp_base`. Shapes (B, V) -> (B, V).

    Tokens with `logp_rl = -inf` (masked upstream) stay `-inf` for every gamma; a base log-prob that underflowed to
    `-inf` where the RL model is finite is floored at log(float32 tiny), so the result never contains NaN.
    """
    if gamma == 0.0:
        return rl_logprobs
    base = base_logprobs.clamp(min=LOG_TINY)
    out = (1.0 + gamma) * rl_logprobs - gamma * base
    return out.masked_fill(rl_logprobs == NEG_INF, NEG_INF)
