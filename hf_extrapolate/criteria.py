"""The replacement criteria of the paper: which tokens or positions are redrawn.

Each criterion becomes a boolean "fires" tensor over the proposal's tokens:
- token-level `logp_diff`: fires on token y when `logp_rl(y) - logp_base(y) < threshold`, shape (B, V);
- position-level (`entropy`, `rl_entropy`, `kl`, `reverse_kl`, `avg_kl`): fires on every token of a row when the
  row's metric `> threshold`, shape (B, 1);
- `always` / `never`: constant (B, 1).
`random` is not a mask but a mixture weight (it fires with probability `threshold` whatever the token) and is handled
by `hf_extrapolate.directional`.

All metrics use the raw distributions (temperature 1, no truncation), as in the paper.
"""

from __future__ import annotations

import torch

from .config import POSITION_CRITERIA
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


def fires(
    criterion: str, threshold: float, rl_logprobs: torch.Tensor, base_logprobs: torch.Tensor
) -> torch.Tensor:
    """Where the criterion fires. Returns bool (B, V) for `logp_diff`, (B, 1) for position-level and constant ones.

    `random` has no mask: see `hf_extrapolate.directional.directional_logprobs`.
    """
    if criterion == "logp_diff":
        # NaN (both -inf: a token masked upstream) compares False: a masked token never fires.
        return (rl_logprobs - base_logprobs) < threshold
    rows = rl_logprobs.shape[0]
    if criterion == "always":
        return torch.ones(rows, 1, dtype=torch.bool, device=rl_logprobs.device)
    if criterion == "never":
        return torch.zeros(rows, 1, dtype=torch.bool, device=rl_logprobs.device)
    if criterion in POSITION_CRITERIA:
        return (position_metric(criterion, rl_logprobs, base_logprobs) > threshold).unsqueeze(-1)
    raise ValueError(f"`criterion` (={criterion!r}) has no firing mask; use it through `directional_logprobs`.")
