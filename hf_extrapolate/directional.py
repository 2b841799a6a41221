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

from .config import TOKEN_CRITERIA, ExtrapolationConfig
from .criteria import fires
from .distributions import NEG_INF, entropy, extrapolated_logits, warp_logprobs

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
    if config.view_top_k is not None:
        return top_k_view_step(rl, base, config, greedy=greedy, generator=generator)
    log_p, log_r = proposal_and_replacement(rl, base, config)
    criterion, tau = config.criterion, config.threshold
    rows = rl.shape[0]

    if greedy:
        if criterion == "random":
            fire = torch.rand(rows, device=rl.device, generator=generator) < tau
        elif criterion in TOKEN_CRITERIA:  # only the greedy token's difference matters: gather, no (B, V) mask
            y0 = log_p.argmax(dim=-1, keepdim=True)
            fire = fires(criterion, tau, rl.gather(-1, y0), base.gather(-1, y0), config.proposal).squeeze(-1)
        else:
            fire = fires(criterion, tau, rl, base).squeeze(-1)
        return torch.where(fire.unsqueeze(-1), log_r, log_p), fire.float(), log_r

    if criterion == "random":
        keep = math.log1p(-tau) if tau < 1.0 else NEG_INF
        swap = math.log(tau) if tau > 0.0 else NEG_INF
        log_q = torch.logaddexp(log_p + keep, log_r + swap)
        return log_q, torch.full((rows,), tau, device=rl.device), log_r

    mask = fires(criterion, tau, rl, base, config.proposal)
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


# ---------------------------------------------------------------------------------------------------------------------
# The reference code's step: what an engine that returns only the top-k log-probs (plus the drawn token) shows.
#
# The paper's reference script asks two vLLM engines for one token each with `logprobs=k` (k = 50) and sees, for the
# proposal ("main") engine, its top-k raw log-probs plus the token it drew, and for the other engine its top-k. From
# these it computes (a) the other model's log-prob of a token it does not show as the smallest value it shows, in the
# gate and in the redraw; (b) the redraw over the proposal's shown tokens, i.e. its top-k plus the drawn token; (c) the
# entropy / KL criteria on the renormalised shown values. The other engine's own drawn token, which the reference also
# sees, is ignored here (it only adds a token the other model ranks outside its top-k, with a random value).
#
# Because the redraw's candidates depend on the drawn token y, the marginal is not p [no fire] + M r. With
# K = the proposal's top-k, r_C = warp(ext restricted to C) and f(y) the firing weight:
#     q(z) = p(z) (1 - f(z)) + sum_{y in K} p(y) f(y) r_K(z) + sum_{y not in K} p(y) f(y) r_{K + y}(z).
# The last sum is computed in closed form: top-p over K + {y} keeps a prefix of K's sorted candidates whose length
# m(y) follows from where y's weight falls (a `searchsorted`), so r_{K + y}(c_j) = W_j / Z(y) for the first m(y)
# candidates c_j, and summing p(y) f(y) / Z(y) by m(y) gives each candidate's coefficient in one scatter-add.
# ---------------------------------------------------------------------------------------------------------------------


def _roles(rl: torch.Tensor, base: torch.Tensor, config: ExtrapolationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return (rl, base) if config.proposal == "rl" else (base, rl)


def shown_to_proposal(other: torch.Tensor, k: int) -> torch.Tensor:
    """The other model's log-probs as the reference sees them: its top-k values, and the smallest of them for every
    token it does not show. other: (B, V). Returns (B, V), `max(l_other, k-th largest l_other)`."""
    return torch.maximum(other, other.topk(k, dim=-1).values[..., -1:])


def _weighted(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`weight * values` with 0 where the weight is 0 (so that 0 * -inf is 0, not NaN)."""
    return torch.where(weight > 0, weight * values, torch.zeros_like(values))


def _proposal_view_entropy(prop: torch.Tensor, top_idx: torch.Tensor, in_top: torch.Tensor) -> torch.Tensor:
    """Entropy of the proposal's renormalised shown values K + {y}, per drawn token y. Returns (B, V)."""
    prop_k = prop.gather(-1, top_idx)
    a_k = prop_k.exp()
    total, plogp = a_k.sum(-1, keepdim=True), _weighted(a_k, prop_k).sum(-1, keepdim=True)
    a_y = torch.where(in_top, torch.zeros_like(prop), prop.exp())
    z = total + a_y
    return z.log() - (plogp + _weighted(a_y, prop)) / z


def _other_view_entropy(other: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the other model's renormalised top-k values. Returns (B, 1)."""
    return entropy(other.topk(k, dim=-1).values.log_softmax(-1)).unsqueeze(-1)


def _kl_proposal_view_to_other(
    prop: torch.Tensor, other_seen: torch.Tensor, top_idx: torch.Tensor, in_top: torch.Tensor
) -> torch.Tensor:
    """KL(proposal shown on K + {y} || other aligned on the same tokens), both renormalised, per y. Returns (B, V)."""
    prop_k, seen_k = prop.gather(-1, top_idx), other_seen.gather(-1, top_idx)
    e_k = prop_k.exp()
    sx, so = e_k.sum(-1, keepdim=True), seen_k.exp().sum(-1, keepdim=True)
    bx = _weighted(e_k, prop_k - seen_k).sum(-1, keepdim=True)
    zero = torch.zeros_like(prop)
    e_y = torch.where(in_top, zero, prop.exp())
    o_y = torch.where(in_top, zero, other_seen.exp())
    zx = sx + e_y
    return (bx + _weighted(e_y, prop - other_seen)) / zx - zx.log() + (so + o_y).log()


def _kl_other_view_to_proposal(
    prop: torch.Tensor, other: torch.Tensor, k: int, in_top: torch.Tensor
) -> torch.Tensor:
    """KL(other shown on its top-k || proposal aligned on those tokens), both renormalised, per drawn token y.

    The proposal shows K + {y}; a token it does not show gets the smallest value it shows, `min(l_p(K_k), l_p(y))`.
    Returns (B, V).
    """
    other_k, other_idx = other.topk(k, dim=-1)
    log_a = other_k.log_softmax(-1)
    a = log_a.exp()
    shown = in_top.gather(-1, other_idx)  # which of the other's top-k the proposal shows whatever y is
    prop_at = prop.gather(-1, other_idx)
    neg_entropy = _weighted(a, log_a).sum(-1, keepdim=True)
    inner = _weighted(a * shown, prop_at).sum(-1, keepdim=True)
    a_out = (a * ~shown).sum(-1, keepdim=True)
    n_out = (~shown).sum(-1, keepdim=True).to(prop.dtype)
    e_in = torch.where(shown, prop_at.exp(), torch.zeros_like(prop_at)).sum(-1, keepdim=True)
    pad = torch.minimum(prop, prop.topk(k, dim=-1).values[..., -1:])  # (B, V): what an unshown token gets
    pad_term = torch.where(a_out > 0, a_out * pad, torch.zeros_like(pad))
    return neg_entropy - inner - pad_term + (e_in + n_out * pad.exp()).log()


def top_k_view_metric(
    criterion: str, rl: torch.Tensor, base: torch.Tensor, config: ExtrapolationConfig, top_idx: torch.Tensor,
    in_top: torch.Tensor,
) -> torch.Tensor:
    """A position-level criterion's metric on the top-k views: (B, V) per drawn token when it reads the proposal's
    view (which shows the drawn token), (B, 1) when it reads only the other model's view.

    `entropy` is H(base view), `rl_entropy` H(RL view), `kl` KL(RL view || base aligned), `reverse_kl`
    KL(base view || RL aligned), `avg_kl` their mean, each as the reference computes it.
    """
    k = top_idx.shape[-1]
    prop, other = _roles(rl, base, config)
    proposal_is_rl = config.proposal == "rl"
    if criterion in ("entropy", "rl_entropy"):
        reads_proposal = (criterion == "rl_entropy") == proposal_is_rl
        return _proposal_view_entropy(prop, top_idx, in_top) if reads_proposal else _other_view_entropy(other, k)
    if criterion in ("kl", "reverse_kl", "avg_kl"):
        from_proposal = _kl_proposal_view_to_other(prop, shown_to_proposal(other, k), top_idx, in_top)
        from_other = _kl_other_view_to_proposal(prop, other, k, in_top)
        if criterion == "avg_kl":
            return 0.5 * (from_proposal + from_other)
        # kl = KL(rl || base): from the proposal's view when the RL model proposes
        return from_proposal if (criterion == "kl") == proposal_is_rl else from_other
    raise ValueError(f"`criterion` (={criterion!r}) is not position-level.")


def _view_fire_weight(
    rl_seen: torch.Tensor, base_seen: torch.Tensor, rl: torch.Tensor, base: torch.Tensor,
    config: ExtrapolationConfig, top_idx: torch.Tensor, in_top: torch.Tensor,
) -> torch.Tensor:
    """Probability that the gate fires when y is drawn: (B, V) or (B, 1), float."""
    criterion, tau = config.criterion, config.threshold
    if criterion == "random":
        return torch.full((rl.shape[0], 1), tau, dtype=rl.dtype, device=rl.device)
    if criterion in TOKEN_CRITERIA or criterion in ("always", "never"):
        return fires(criterion, tau, rl_seen, base_seen, config.proposal).to(rl.dtype)
    return (top_k_view_metric(criterion, rl, base, config, top_idx, in_top) > tau).to(rl.dtype)


def top_k_view_marginal(
    log_p: torch.Tensor, fire: torch.Tensor, log_weight: torch.Tensor, top_idx: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact marginal of "draw y ~ p; with probability f(y) redraw from top-p(softmax(log_weight) on K + {y})".

    log_p: (B, V) log-probs of the first draw; fire: (B, V) or (B, 1) firing probability f(y); log_weight: (B, V)
    unnormalised log-weights of the redraw (temperature already applied); top_idx: (B, k) the candidates K (the
    proposal's top-k). Returns `(log_q, M, log_r)`: log q (B, V), M = sum_y p(y) f(y) (B,), and log r (B, V) the
    effective redraw distribution (the mixture of the r_C, so that q = p (1 - f) + M r).
    """
    p = log_p.exp()
    pf = p * fire
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top_idx, True)
    mass = pf.sum(-1)
    mass_in = torch.where(in_top, pf, torch.zeros_like(pf)).sum(-1, keepdim=True)
    # the candidates K sorted by their redraw weight, shifted so that the largest weight is 1
    u_k, order = log_weight.gather(-1, top_idx).sort(dim=-1, descending=True)
    idx_sorted = top_idx.gather(-1, order)
    shift = u_k[:, :1].nan_to_num(0.0, neginf=0.0)
    w_k = (u_k - shift).exp()  # (B, k), descending
    cum = torch.cat([torch.zeros_like(w_k[:, :1]), w_k.cumsum(-1)], dim=-1)  # (B, k+1): mass of the first j
    total = cum[:, -1:]
    w = (log_weight - shift).clamp(max=80.0).exp()  # (B, V): weight of a drawn y added to K
    w = torch.where(in_top, torch.zeros_like(w), w)
    k = w_k.shape[-1]
    if top_p >= 1.0:
        m0 = torch.full_like(total, k, dtype=torch.long)
        m = torch.full_like(w, k, dtype=torch.long)
        kept_y = torch.ones_like(w, dtype=torch.bool)
    else:
        above = cum[:, :-1].contiguous()  # mass strictly above candidate j, ascending in j
        m0 = torch.searchsorted(above, top_p * total, side="left")  # (B, 1)
        z = total + w
        rank = torch.searchsorted((-w_k).contiguous(), -w, side="left")  # candidates heavier than y
        n1 = torch.searchsorted(above, top_p * z, side="left")
        n2 = torch.searchsorted(above, top_p * z - w, side="left")
        m = torch.minimum(rank, n1) + (n2 - rank).clamp(min=0)
        kept_y = cum.gather(-1, rank) < top_p * z
    z0 = cum.gather(-1, m0)
    z_kept = cum.gather(-1, m) + torch.where(kept_y, w, torch.zeros_like(w))
    tiny = torch.finfo(p.dtype).tiny
    g = torch.where(in_top, torch.zeros_like(pf), pf) / z_kept.clamp(min=tiny)  # p(y) f(y) / Z(y), y outside K
    by_length = torch.zeros_like(cum).scatter_add_(-1, m, g)  # (B, k+1): summed by prefix length m(y)
    coef = by_length.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # candidate j is kept by every y with m(y) >= j
    positions = torch.arange(1, k + 1, device=p.device)
    first = torch.where(positions <= m0, mass_in / z0.clamp(min=tiny), torch.zeros_like(w_k))
    redraw_k = w_k * (first + coef)
    redraw = torch.where(kept_y, g * w, torch.zeros_like(g)).scatter(-1, idx_sorted, redraw_k)
    q = p * (1.0 - fire) + redraw
    log_r = torch.where(mass.unsqueeze(-1) > 0, redraw.log() - mass.log().unsqueeze(-1), NEG_INF)
    return q.log(), mass, log_r


def top_k_view_step(
    rl: torch.Tensor,
    base: torch.Tensor,
    config: ExtrapolationConfig,
    *,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`directional_step_with_replacement` for `config.view_top_k = k`: the reference code's step, exactly.

    rl, base: normalised (B, V) log-probs (`normalize_pair`). The first draw is p = warp(l_proposal) on the full
    vocabulary (the proposal engine samples with temperature / top-p); the gate and the criteria read the raw top-k
    views (vLLM returns raw log-probs); the redraw is top-p(softmax(((1+gamma) l_rl' - gamma l_base') / T)) on the
    proposal's top-k plus the drawn token, with l' the values the reference sees. Returns `(scores, M, log_r)` as
    `directional_step_with_replacement`.
    """
    k = min(config.view_top_k, rl.shape[-1])
    prop, other = _roles(rl, base, config)
    other_seen = shown_to_proposal(other, k)
    rl_seen, base_seen = (rl, other_seen) if config.proposal == "rl" else (other_seen, base)
    log_p = warp_logprobs(prop, config.temperature, 0, config.top_p, normalized=True)
    top_idx = prop.topk(k, dim=-1).indices
    in_top = torch.zeros_like(prop, dtype=torch.bool).scatter_(-1, top_idx, True)
    log_weight = extrapolated_logits(rl_seen, base_seen, config.gamma)
    if config.temperature != 1.0:
        log_weight = log_weight / config.temperature
    if greedy:
        # the greedy token is the proposal's most likely one, inside its top-k: the redraw is over the top-k alone
        log_r = warp_logprobs(log_weight.masked_fill(~in_top, NEG_INF), 1.0, 0, config.top_p)
        y0 = log_p.argmax(dim=-1, keepdim=True)
        if config.criterion == "random":
            fire = torch.rand(rl.shape[0], device=rl.device, generator=generator) < config.threshold
        else:
            weight = _view_fire_weight(rl_seen, base_seen, rl, base, config, top_idx, in_top)
            fire = weight.expand_as(log_p).gather(-1, y0).squeeze(-1) > 0.5
        return torch.where(fire.unsqueeze(-1), log_r, log_p), fire.float(), log_r
    fire = _view_fire_weight(rl_seen, base_seen, rl, base, config, top_idx, in_top)
    return top_k_view_marginal(log_p, fire, log_weight, top_idx, config.top_p)
