"""Probability-aware advantage reweighting for DAPO/GRPO: the paper's Eq. 8 and the two baselines it compares with.

All functions are pure: they take per-token log-probabilities of the sampled response tokens under the *old* policy
(the policy that generated them), `old_logprobs` of shape `(B, T)`, and a response mask of shape `(B, T)` (1 on
response tokens, 0 on padding), and return new tensors. The weights are computed from `old_logprobs.detach()`, so no
gradient ever flows through them: they rescale the advantage, exactly like a constant per-token coefficient.

Methods (`w` is the weight multiplying the advantage `A` of a response token; `p = exp(old_logprob)`):

- `"lowprob"` (ours, the paper's Eq. 8, as in its reference training code): `w_t = 1 + alpha * (1 - p_t)`, in
  `[1, 1 + alpha]`: low-probability tokens, where RLVR concentrates its updates, get a larger advantage. The paper
  uses alpha = 0.2 for Qwen2.5-Math-7B and 0.1 for Qwen3-8B-Base, with DAPO.
- `"dominate"` (Yang et al. 2025, "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs", Advantage
  Reweighting): `w_t = alpha * p_t + (1 - alpha)`, in `[1 - alpha, 1]`: the opposite direction, high-probability
  tokens keep their advantage and low-probability ones are damped. Checked against the official code
  (github.com/zhyang2226/AR-Lopti, `compute_reweight_advantage`, method "both_linear_normal"): it applies
  `(reweight_k * exp(old_log_probs) + reweight_tau) * advantages` to positive and negative advantages alike, once per
  step from the old log-probs, with `reweight_k = alpha = 0.2`, `reweight_tau = 1 - alpha = 0.8` in its script.
- `"ppl"` (Deng et al. 2025, "Decomposing the Entropy-Performance Exchange: The Missing Keys to Unlocking Effective
  Reinforcement Learning"): one weight per response, `w_i = max(0, 1 - alpha * z_i)`, where `z_i` is the z-score of
  the response's log-perplexity `-mean_t old_logprob_{i,t}` within its group of responses to the same prompt, so
  low-perplexity responses are favoured. See `ppl_weights` for what is uncertain.
- `"none"`: `w_t = 1` (plain DAPO/GRPO).

What this module does not do: compute the advantages themselves (group-normalised rewards), clip, or aggregate the
loss; those stay with the trainer (see `hf_extrapolate.training.trl_trainer`).
"""

from __future__ import annotations

import torch

from .config import resolve_alpha

__all__ = [
    "dominate_weights",
    "lowprob_weights",
    "ppl_sequence_weights",
    "ppl_weights",
    "reweight_advantages",
    "sequence_log_perplexity",
    "token_weights",
]


def _check_token_inputs(old_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(old_logprobs, torch.Tensor) or old_logprobs.dim() != 2 or not old_logprobs.is_floating_point():
        raise ValueError(
            "`old_logprobs` must be a floating-point tensor of shape (B, T) holding the old policy's log-probability "
            f"of each sampled response token, got {_describe(old_logprobs)}."
        )
    if not isinstance(mask, torch.Tensor) or mask.shape != old_logprobs.shape:
        raise ValueError(
            f"`mask` must be a tensor of the same shape as `old_logprobs` {tuple(old_logprobs.shape)} (1 on response "
            f"tokens, 0 on padding), got {_describe(mask)}."
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"`mask` must hold only 0 and 1 (1 on response tokens), got the value {bad}; a fractional "
                         "mask is not a token weight here: pass `mask > 0` (or the 0/1 response mask).")
    values = old_logprobs.detach()[mask.bool()]
    if values.numel():
        if bool(values.isnan().any()) or bool(values.isinf().any()):
            raise ValueError("`old_logprobs` has NaN or +-inf on response tokens: pass finite log-probabilities "
                             "(log_softmax of the old policy's logits, gathered at the sampled tokens).")
        if float(values.max()) > LOGPROB_TOLERANCE:
            raise ValueError(
                f"`old_logprobs` holds {float(values.max()):.4g} > 0 on a response token: these are not "
                "log-probabilities (logits passed by mistake?). Pass `logits.log_softmax(-1).gather(-1, ids)`."
            )


# a log-prob above 0 by more than rounding (bf16 near 0 rounds by < 0.004) is not a log-prob
LOGPROB_TOLERANCE = 1e-2


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def _masked_old_probs(old_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_old, mask as a float tensor); p_old is detached and set to 1 off the mask, so padding never yields NaN."""
    keep = mask.bool()
    p_old = old_logprobs.detach().masked_fill(~keep, 0.0).exp().clamp(max=1.0)  # rounding above 0 is p = 1
    return p_old, keep.to(p_old.dtype)


def lowprob_weights(old_logprobs: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Per-token weights of the paper's Eq. 8: `w_t = 1 + alpha * (1 - p_old,t)`; 0 off the mask.

    old_logprobs: (B, T) old-policy log-probs of the sampled tokens (detached here). mask: (B, T). Returns (B, T).
    Weights lie in `[1, 1 + alpha]`; `alpha = 0` gives `w = mask`.
    """
    _check_token_inputs(old_logprobs, mask)
    alpha = resolve_alpha("lowprob", alpha)
    p_old, m = _masked_old_probs(old_logprobs, mask)
    return (1.0 + alpha * (1.0 - p_old)) * m


def dominate_weights(old_logprobs: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Per-token weights of Yang et al. (2025)'s Advantage Reweighting: `w_t = alpha * p_old,t + (1 - alpha)`.

    old_logprobs: (B, T) old-policy log-probs of the sampled tokens (detached here). mask: (B, T). Returns (B, T),
    0 off the mask. Weights lie in `[1 - alpha, 1]`, `alpha` in [0, 1]; `alpha = 0` gives `w = mask`.
    """
    _check_token_inputs(old_logprobs, mask)
    alpha = resolve_alpha("dominate", alpha)
    p_old, m = _masked_old_probs(old_logprobs, mask)
    return (alpha * p_old + (1.0 - alpha)) * m


def sequence_log_perplexity(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-perplexity of each response, `log PPL_i = -sum_t m_it * logp_it / sum_t m_it`. (B, T) -> (B,).

    Computed from `logprobs.detach()`; a response with no token (empty mask row) gets 0.
    """
    _check_token_inputs(logprobs, mask)
    m = mask.bool()
    lp = logprobs.detach().masked_fill(~m, 0.0)
    return -lp.sum(-1) / m.sum(-1).clamp(min=1).to(lp.dtype)


def ppl_sequence_weights(
    log_ppl: torch.Tensor, alpha: float = 0.1, group_size: int | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-response weights of the "PPL" baseline: `w_i = max(0, 1 - alpha * z_i)`. (B,) -> (B,).

    `z_i = (log PPL_i - mean_g) / std_g` is the z-score of the response's log-perplexity within its group `g` of
    `group_size` consecutive responses (TRL and verl lay out the `G` responses to one prompt consecutively); `None`
    treats the whole batch as one group. The statistics use only `valid` responses (default: all) with the population
    std; a group whose log-perplexities are all equal gets `z = 0`, i.e. `w = 1`. Invalid responses get `w = 1`.
    The mean weight of a group is 1 (before the clamp at 0, which only acts when `alpha * z > 1`; `|z| <= sqrt(G-1)`).
    """
    if not isinstance(log_ppl, torch.Tensor) or log_ppl.dim() != 1 or not log_ppl.is_floating_point():
        raise ValueError(f"`log_ppl` must be a floating-point tensor of shape (B,), got {_describe(log_ppl)}.")
    alpha = resolve_alpha("ppl", alpha)
    n = log_ppl.shape[0]
    if group_size is None:
        group_size = max(n, 1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size != 0:
        raise ValueError(
            f"`group_size` (={group_size!r}) must be a positive integer dividing the number of responses ({n}): the "
            "number of responses sampled per prompt (TRL's `num_generations`), or None for one group."
        )
    if valid is None:
        valid = torch.ones_like(log_ppl, dtype=torch.bool)
    elif not isinstance(valid, torch.Tensor) or valid.shape != log_ppl.shape:
        raise ValueError(f"`valid` must be a tensor of shape {tuple(log_ppl.shape)} or None, got {_describe(valid)}.")
    x = log_ppl.detach().view(-1, group_size)
    v = valid.view(-1, group_size).to(x.dtype)
    count = v.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * v).sum(-1, keepdim=True) / count
    std = (((x - mean) ** 2) * v).sum(-1, keepdim=True).div(count).sqrt()
    z = torch.where(std > 0, (x - mean) / std.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    w = (1.0 - alpha * z).clamp(min=0.0)
    return torch.where(v.bool(), w, torch.ones_like(w)).view(-1)


def ppl_weights(
    old_logprobs: torch.Tensor, mask: torch.Tensor, alpha: float = 0.1, group_size: int | None = None
) -> torch.Tensor:
    """Per-token weights of the "PPL" baseline (Deng et al. 2025): each response's weight on all its tokens.

    old_logprobs: (B, T), mask: (B, T). Returns (B, T) = `ppl_sequence_weights(log PPL, alpha, group_size)[:, None]
    * mask`, where `log PPL_i = -mean_t old_logprob_it` (see `sequence_log_perplexity`).

    Uncertain: the cited paper's exact normalisation of log PPL and its alpha could not be checked here (neither its
    method section nor its code was reachable). This follows its description (a per-response weight derived from the
    normalised log-perplexity, favouring low-perplexity responses): z-score within the prompt's group, `1 - alpha *
    z`, clamped at 0 so a weight never flips the advantage's sign; `alpha = 0.1` is our default, not the paper's.
    """
    _check_token_inputs(old_logprobs, mask)
    valid = mask.bool().any(-1)
    seq_w = ppl_sequence_weights(sequence_log_perplexity(old_logprobs, mask), alpha, group_size, valid)
    return seq_w.unsqueeze(-1) * mask.to(seq_w.dtype)


def token_weights(
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    method: str = "lowprob",
    alpha: float | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """The (B, T) weights of `method` (one of `REWEIGHTING_METHODS`), 0 off the mask; `alpha=None` = its default.

    `group_size` is only used by "ppl" (responses per prompt). "none" returns the mask as floats.
    """
    _check_token_inputs(old_logprobs, mask)
    alpha = resolve_alpha(method, alpha)
    if method == "lowprob":
        return lowprob_weights(old_logprobs, mask, alpha)
    if method == "dominate":
        return dominate_weights(old_logprobs, mask, alpha)
    if method == "ppl":
        return ppl_weights(old_logprobs, mask, alpha, group_size)
    return mask.to(old_logprobs.dtype)


def reweight_advantages(
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    method: str = "lowprob",
    alpha: float | None = None,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """Per-token reweighted advantages `Â_t = A · w_t` for the DAPO/GRPO loss (the paper's Eq. 8 by default).

    Args:
        advantages (`torch.Tensor` of shape `(B,)`, `(B, 1)` or `(B, T)`):
            Advantages, one per response (GRPO/DAPO) or one per token.
        old_logprobs (`torch.Tensor` of shape `(B, T)`):
            Log-probabilities of the sampled response tokens under the old (sampling) policy. Detached here: the
            weights carry no gradient and stay fixed across the PPO mini-batches of a step.
        mask (`torch.Tensor` of shape `(B, T)`):
            1 on response tokens, 0 on padding. Masked tokens get `Â = 0`.
        method (`str`, defaults to `"lowprob"`):
            `"lowprob"`: `w_t = 1 + alpha (1 - p_old,t)` (Eq. 8); `"dominate"`: `w_t = alpha p_old,t + 1 - alpha`
            (Yang et al. 2025); `"ppl"`: `w_i = max(0, 1 - alpha z(log PPL_i))` per response (Deng et al. 2025);
            `"none"`: `w = 1`.
        alpha (`float`, *optional*):
            Strength; `None` uses `DEFAULT_ALPHA[method]` (0.2 for "lowprob", the paper's Qwen2.5-Math-7B value;
            use 0.1 for Qwen3-8B-Base). `alpha = 0` is the identity on response tokens.
        group_size (`int`, *optional*):
            Responses per prompt, for "ppl" only (consecutive rows form a group); `None` = one group.

    Returns:
        `torch.Tensor` of shape `(B, T)`: the reweighted per-token advantages, 0 off the mask.

    Example:

    ```python
    >>> import torch
    >>> from hf_extrapolate.training import reweight_advantages
    >>> adv = torch.tensor([1.0, -1.0])
    >>> logp = torch.log(torch.tensor([[0.5, 1.0], [0.25, 0.5]]))
    >>> reweight_advantages(adv, logp, torch.tensor([[1, 1], [1, 0]]), method="lowprob", alpha=0.2)
    tensor([[ 1.1000,  1.0000],
            [-1.1500,  0.0000]])
    ```
    """
    _check_token_inputs(old_logprobs, mask)
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"`advantages` must be a tensor of shape (B,) or (B, T), got {_describe(advantages)}.")
    batch, length = old_logprobs.shape
    if advantages.dim() == 1 and advantages.shape[0] == batch:
        advantages = advantages.unsqueeze(-1)
    if advantages.dim() != 2 or advantages.shape[0] != batch or advantages.shape[1] not in (1, length):
        raise ValueError(
            f"`advantages` must have shape ({batch},), ({batch}, 1) or ({batch}, {length}) to match `old_logprobs` "
            f"{tuple(old_logprobs.shape)}, got shape {tuple(advantages.shape)}."
        )
    if advantages.is_floating_point() and not bool(advantages.isfinite().all()):
        raise ValueError("`advantages` has NaN or +-inf: check the rewards and their group normalisation.")
    weights = token_weights(old_logprobs, mask, method, alpha, group_size)
    if not advantages.is_floating_point():
        advantages = advantages.to(weights.dtype)
    return (advantages * weights.to(advantages.dtype)).masked_fill(~mask.bool(), 0.0)
