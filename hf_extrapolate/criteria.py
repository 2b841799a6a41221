"""The replacement criteria of the paper: which tokens or positions are redrawn.

Each criterion becomes a boolean "fires" tensor over the proposal's tokens:
- token-level `logp_diff`: fires on token y when `logp_rl(y) - logp_base(y) < threshold`, shape (B, V) (the
  paper's Eq. 1, whichever model proposes);
- token-level, role-relative (the reference code's `neg_logp` / `logp`, defined by role, not by model):
  `logp_other_minus_proposal` fires when `logp_other(y) - logp_proposal(y) < threshold`,
  `logp_proposal_minus_other` when `logp_proposal(y) - logp_other(y) < threshold`. With the base proposing,
  `logp_other_minus_proposal` is `logp_diff`; with the RL model proposing, `logp_proposal_minus_other` is;
- position-level (`entropy`, `rl_entropy`, `kl`, `reverse_kl`, `avg_kl`): fires on every token of a row when the
  row's metric `> threshold`, shape (B, 1);
- `always` / `never`: constant (B, 1).
`random` is not a mask but a mixture weight (it fires with probability `threshold` whatever the token) and is handled
by `hf_extrapolate.directional`.

All metrics use the raw distributions (temperature 1, no truncation), as in the paper.
"""

from __future__ import annotations

import torch

from .config import POSITION_CRITERIA, TOKEN_CRITERIA
from .distributions import entropy, kl_divergence


def position_metric(criterion: str, rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """The position-level metric of `criterion`. rl_logprobs, base_logprobs: (B, V). Returns (B,).

    - `entropy`: H(pi_base); `rl_entropy`: H(pi_rl);
    - `kl`: KL(pi_rl || pi_base); `reverse_kl`: KL(pi_base || pi_rl); `avg_kl`: their mean.
    """
    if criterion == "entropy":
        return entropy(base_logprobs)
    if criterion == "rl_entropy":
        return entropy(rl_logprobs)
    if criterion == "kl":
        return kl_divergence(rl_logprobs, base_logprobs)
    if criterion == "reverse_kl":
        return kl_divergence(base_logprobs, rl_logprobs)
    if criterion == "avg_kl":
        return 0.5 * (kl_divergence(rl_logprobs, base_logprobs) + kl_divergence(base_logprobs, rl_logprobs))
    raise ValueError(f"`criterion` (={criterion!r}) is not position-level; position-level criteria: {POSITION_CRITERIA}.")


def token_difference(
    criterion: str, rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor, proposal: str = "base"
) -> torch.Tensor:
    """The log-prob difference a token-level `criterion` compares with its threshold. (B, V), (B, V) -> (B, V).

    `logp_diff`: l_rl - l_base; `logp_other_minus_proposal`: l_other - l_proposal; `logp_proposal_minus_other`:
    l_proposal - l_other, where `proposal` ("base" or "rl") names the proposing model.
    """
    rl_minus_base = rl_logprobs - base_logprobs
    if criterion == "logp_diff":
        return rl_minus_base
    proposal_is_rl = proposal == "rl"
    if criterion == "logp_other_minus_proposal":
        return -rl_minus_base if proposal_is_rl else rl_minus_base
    if criterion == "logp_proposal_minus_other":
        return rl_minus_base if proposal_is_rl else -rl_minus_base
    raise ValueError(f"`criterion` (={criterion!r}) is not token-level; token-level criteria: {TOKEN_CRITERIA}.")


def fires(
    criterion: str,
    threshold: float,
    rl_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    proposal: str = "base",
) -> torch.Tensor:
    """Where the criterion fires. Returns bool (B, V) for token-level criteria, (B, 1) for position-level and
    constant ones. `proposal` ("base" or "rl") matters only to the role-relative criteria.

    `random` has no mask: see `hf_extrapolate.directional.directional_logprobs`.
    """
    if criterion in TOKEN_CRITERIA:
        # NaN (both -inf: a token masked upstream) compares False: a masked token never fires.
        return token_difference(criterion, rl_logprobs, base_logprobs, proposal) < threshold
    rows = rl_logprobs.shape[0]
    if criterion == "always":
        return torch.ones(rows, 1, dtype=torch.bool, device=rl_logprobs.device)
    if criterion == "never":
        return torch.zeros(rows, 1, dtype=torch.bool, device=rl_logprobs.device)
    if criterion in POSITION_CRITERIA:
        return (position_metric(criterion, rl_logprobs, base_logprobs) > threshold).unsqueeze(-1)
    raise ValueError(f"`criterion` (={criterion!r}) has no firing mask; use it through `directional_logprobs`.")
