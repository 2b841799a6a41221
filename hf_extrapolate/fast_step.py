"""The step distribution of `hf_extrapolate.directional` in fewer, cheaper passes over `(B, V)`: the processor's hot
path for the common configurations.

`directional_step_with_replacement` is the definition, written for clarity (boolean masks, `torch.where`,
`logaddexp`). On CPU those are the slow kernels: at (4, 32000) fp32 on one thread a boolean comparison costs about 4x
a float one, `where` / `masked_fill` 20x an addition, `logaddexp` and `argmax` 5-15x. This module computes the same
distribution with float arithmetic and fused softmax kernels only:

- the criterion is a float 0/1 tensor (`torch.lt(..., out=float)`; NaN, from a token masked in both models, is 0);
- sampling: `q = p (1 - f) + M r` is formed in probability space, `Q = P - P f + M R` with `P = exp(log p)` and
  `R = softmax(ext)`, then `log q = log Q`. That is exact (a few ulps) wherever `q` is a normal float; a row where
  some allowed token has `q < 1e-30` (log q below -69: a peaked distribution, a low temperature) is recomputed in
  log space, `logaddexp(log p - f * FLT_MAX, log M + log r)`, which is exact everywhere. On accelerators (where a
  data-dependent branch would synchronise host and device) the log-space form is always used;
- greedy: the criterion is evaluated at `y0 = argmax p` only, and the replacement distribution is computed only at
  steps where it fires on some row (on CPU; on accelerators at every step, selected with `where`).

Intermediates live in a `Workspace` of reused buffers: on CPU a fresh (B, V) tensor above glibc's mmap threshold
(128 KiB: (1, 32768) float32) is page-faulted in and returned to the system at every step, which costs as much as the
arithmetic; only the returned scores are allocated per step.

It covers token-level criteria and `random`, any proposal, temperature, `gamma > -1`; `fast_step` returns None for
everything else (top-k / top-p truncation, `candidate_top_k`, `view_top_k`, position-level criteria), which the
caller then computes with `directional_step_with_replacement`. Tokens that are `-inf` in the RL scores are masked in
the base distribution exactly as `normalize_pair` does. `tests/test_fast_step.py` checks every covered case against
`directional_step_with_replacement` (and that the check fails for a wrong formula).

On CPU, with `hf_extrapolate.cpu_kernel.enable()` (opt-in: compiled on this machine), float32 steps go through a
fused C++ kernel computing the same quantities in four or five passes per row (`tests/test_cpu_kernel.py`).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch

from . import cpu_kernel
from .config import TOKEN_CRITERIA, ExtrapolationConfig
from .distributions import LOG_TINY

FP32_MIN = torch.finfo(torch.float32).min
# below this a probability is formed in log space instead (far above float32's smallest normal, 1.2e-38)
SAFE_PROBABILITY = 1e-30


@dataclass
class FastStep:
    """What one step produced.

    `scores` (B, V): log q (sampling) or the greedy scores, a fresh tensor; `mass` (B,): the replaced mass M (under
    greedy decoding on CPU a tensor shared between steps with the same pattern: read it, never modify it);
    `redraw` (B, V): the replacement distribution r, in probability space when `redraw_is_log` is False, as log r
    otherwise (None under greedy decoding) -- a workspace buffer, valid until the next call with the same workspace;
    `finite`: True when both models' scores and the result are known to be usable, else a (B,) tensor that is finite
    iff they are (the caller tests it, and diagnoses which is not)."""

    scores: torch.Tensor
    mass: torch.Tensor
    redraw: torch.Tensor | None
    redraw_is_log: bool
    finite: torch.Tensor | bool


class Workspace:
    """Named float32 buffers reused from step to step (reallocated when the shape or device changes)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buffer


class _Fresh:
    """A workspace that allocates every time (`fast_step` without a workspace)."""

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)


def covers(config: ExtrapolationConfig) -> bool:
    """Whether `fast_step` computes this configuration."""
    return (
        config.view_top_k is None
        and config.candidate_top_k is None
        and not config.top_k
        and config.top_p >= 1.0
        and (config.criterion in TOKEN_CRITERIA or config.criterion == "random")
        and 1.0 + config.gamma > 0.0
    )


def _difference(config: ExtrapolationConfig, rl: torch.Tensor, base: torch.Tensor, out=None) -> torch.Tensor:
    """The signed log-prob difference a token-level criterion compares with its threshold (one subtraction)."""
    criterion, rl_proposes = config.criterion, config.proposal == "rl"
    rl_minus_base = criterion == "logp_diff" or (criterion == "logp_proposal_minus_other") == rl_proposes
    return torch.sub(rl, base, out=out) if rl_minus_base else torch.sub(base, rl, out=out)


@functools.lru_cache(maxsize=64)
def _float32(value: float) -> float:
    """`value` rounded to float32, as torch compares a float32 tensor with a Python number."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: torch's comparison sees +-inf
        return math.copysign(math.inf, value)


@functools.lru_cache(maxsize=256)
def _indicator(fire: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """The float32 0 / 1 tensor of `fire` (one per pattern and device, shared: callers never modify it). Building
    a tensor from a Python list costs as much as a (B, V) pass in the decoding loop; batches repeat few patterns."""
    return torch.tensor(fire, dtype=torch.float32, device=device)


def _extrapolated(config: ExtrapolationConfig, rl: torch.Tensor, base: torch.Tensor, ws) -> torch.Tensor:
    """`((1 + gamma) l_rl - gamma max(l_b, log tiny)) / T` (`distributions.extrapolated_logits`, then temperature)."""
    gamma, temperature = config.gamma, config.temperature
    if gamma == 0.0:
        return rl if temperature == 1.0 else torch.div(rl, temperature, out=ws("ext", rl))
    floored = torch.clamp(base, min=LOG_TINY, out=ws("tmp", rl))
    if gamma > 0.0 and _float32(1.0 + gamma) > 1.0:  # one pass: lerp(b, l, 1 + gamma), -inf where l is -inf
        ext = torch.lerp(floored, rl, 1.0 + gamma, out=ws("ext", rl))
    else:  # -1 < gamma < 0, or 1 + gamma rounding to 1: lerp would form -inf + inf at masked tokens
        ext = torch.mul(rl, 1.0 + gamma, out=ws("ext", rl)).add_(floored, alpha=-gamma)
    return ext if temperature == 1.0 else ext.div_(temperature)


def fast_step(
    rl_scores: torch.Tensor,
    base_scores: torch.Tensor,
    config: ExtrapolationConfig,
    *,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    workspace: Workspace | None = None,
    branch_free: bool | None = None,
) -> FastStep | None:
    """`directional_step_with_replacement(rl_scores, base_scores, config, greedy=greedy)` for the configurations
    `covers` accepts (None otherwise). rl_scores, base_scores: (B, V), never modified.

    `workspace` holds the intermediates between calls (default: allocate). `branch_free` (default: on accelerators)
    computes without reading anything back to the host: the masked, log-space and all-rows forms (what an accelerator
    runs; True on CPU tests them there)."""
    if rl_scores.dim() != 2 or rl_scores.shape != base_scores.shape:
        raise ValueError(
            f"`rl_scores` {tuple(rl_scores.shape)} and `base_scores` {tuple(base_scores.shape)} must both be (batch, "
            "vocab) with the same shape (no broadcasting); align padded vocabularies first (the processor does this)."
        )
    if not covers(config):
        return None
    ws = workspace if workspace is not None else _Fresh()
    on_cpu = not branch_free if branch_free is not None else rl_scores.device.type == "cpu"
    r = rl_scores if rl_scores.dtype == torch.float32 else rl_scores.float()
    b = base_scores if base_scores.dtype == torch.float32 else base_scores.float()
    kernel = cpu_kernel.active() if on_cpu and r.device.type == "cpu" else None
    if kernel is not None:
        return _fused(kernel, config, r.contiguous(), b.contiguous(), greedy, generator, ws)
    temperature = config.temperature
    rl_proposes = config.proposal == "rl"
    # under greedy decoding log p is usually the result: a fresh tensor; everything else lives in the workspace
    rl_is_result = greedy and rl_proposes and temperature == 1.0
    rl = torch.log_softmax(r, dim=-1) if rl_is_result else torch.log_softmax(r, dim=-1, out=ws("rl", r))
    # tokens masked in the RL scores (-inf) are masked in the base too: an additive 0 / -inf mask, skipped on CPU
    # when there is none (reading back is free there; on accelerators it is always applied, without a branch)
    masked = not on_cpu or r.amin().item() == -math.inf
    if masked:
        block = torch.sub(rl, torch.clamp(rl, min=FP32_MIN, out=ws("tmp", r)), out=ws("block", r))
        b = torch.add(b, block, out=ws("masked_base", r))
    else:
        block = None
    base_is_result = greedy and not rl_proposes and temperature == 1.0
    base = torch.log_softmax(b, dim=-1) if base_is_result else torch.log_softmax(b, dim=-1, out=ws("base", r))
    if temperature == 1.0:
        log_p = rl if rl_proposes else base
    else:
        warped = torch.div(r if rl_proposes else b, temperature, out=ws("warped", r))
        log_p = torch.log_softmax(warped, dim=-1) if greedy else torch.log_softmax(warped, dim=-1, out=ws("p", r))

    if greedy:
        return _greedy(config, rl, base, log_p, on_cpu, generator, ws)

    tau = config.threshold
    if config.criterion == "random":
        fire = None
        mass = torch.full((r.shape[0], 1), tau, device=r.device)
    else:
        diff = _difference(config, rl, base, out=ws("diff", r))
        fire = torch.lt(diff, tau, out=ws("fire", r))  # float 0 / 1; NaN (masked in both) is 0
    ext = _extrapolated(config, rl, base, ws)
    p = torch.exp(log_p, out=ws("prob", r))
    if fire is None:
        kept = p.mul_(1.0 - tau)
    else:
        fired = fire.mul_(p)  # p f, in place of the criterion (recomputed from `diff` if needed)
        mass = fired.sum(-1, keepdim=True)
        kept = p.sub_(fired)
    if on_cpu:
        redraw = torch.softmax(ext, dim=-1, out=ws("redraw", r))
        q = kept.addcmul_(redraw, mass)
        # the smallest q over allowed tokens (masked ones, q = 0, are lifted to +inf by the 0 / -inf mask)
        smallest = (torch.sub(q, block, out=ws("tmp", r)) if masked else q).amin().item()
        if smallest > SAFE_PROBABILITY:  # NaN fails too: handled (and diagnosed) by the log-space form
            return FastStep(torch.log(q), mass.squeeze(-1), redraw, False, True)
    log_r = torch.log_softmax(ext, dim=-1, out=ws("redraw", r))
    if fire is None:
        keep = math.log1p(-tau) if tau < 1.0 else float("-inf")
        swap = math.log(tau) if tau > 0.0 else float("-inf")
        log_q = torch.logaddexp(log_p + keep, log_r + swap)
    else:
        fire = torch.lt(diff, tau, out=ws("fire", r))
        # log p where the criterion does not fire; -FLT_MAX (exp -> 0) where it does: no boolean `where`
        kept_log = torch.addcmul(log_p, fire, torch.full_like(mass, FP32_MIN), out=ws("tmp", r))
        log_q = torch.logaddexp(kept_log, log_r + mass.log())
    return FastStep(log_q, mass.squeeze(-1), log_r, True, (mass + log_q.amax(-1, keepdim=True)).squeeze(-1))


_NO_DRAW = torch.empty(0)


def _fused(kernel, config: ExtrapolationConfig, r: torch.Tensor, b: torch.Tensor, greedy: bool,
           generator: torch.Generator | None, ws) -> FastStep:
    """The step through the compiled CPU kernel (`cpu_kernel`): the same quantities in a few passes per row."""
    criterion, rl_proposes = config.criterion, config.proposal == "rl"
    random = criterion == "random"
    rl_minus_base = criterion == "logp_diff" or (criterion == "logp_proposal_minus_other") == rl_proposes
    args = (config.temperature, config.gamma, config.threshold, rl_minus_base, rl_proposes, random, LOG_TINY)
    if greedy:  # the random draw as the eager rule makes it (same generator, same order)
        fire = (torch.rand(r.shape[0], generator=generator) < config.threshold).float() if random else _NO_DRAW
        scores, mass, check, finite = kernel.greedy_step(r, b, fire, *args)
        return FastStep(scores, mass, None, True, True if finite else check)
    redraw = ws("redraw", r)
    # `finite` is the kernel's own test of `check` (a Python bool): no torch reduction on the step's hot path
    log_q, mass, check, finite = kernel.sample_step(r, b, redraw, *args, SAFE_PROBABILITY)
    return FastStep(log_q, mass, redraw, False, True if finite else check)


def _greedy(
    config: ExtrapolationConfig, rl: torch.Tensor, base: torch.Tensor, log_p: torch.Tensor, on_cpu: bool,
    generator: torch.Generator | None, ws,
) -> FastStep:
    """The greedy rule: `log r` on rows where the criterion fires on `y0 = argmax p`, `log p` elsewhere."""
    rows = rl.shape[0]
    y0 = log_p.argmax(dim=-1, keepdim=True)
    rl0, base0 = rl.gather(-1, y0), base.gather(-1, y0)
    tau = config.threshold
    if on_cpu:
        # the (B,) quantities are read back once and decided in Python (float32 semantics), not in a dozen tiny
        # tensor ops: O(B) scalar comparisons, negligible beside the (B, V) passes for any batch size
        if config.criterion == "random":
            fire = (torch.rand(rows, device=rl.device, generator=generator) < tau).tolist()
            values = torch.cat([rl0, base0], dim=1).tolist()
        else:
            values = torch.cat([rl0, base0, _difference(config, rl0, base0)], dim=1).tolist()
            tau32 = _float32(tau)
            fire = [row[2] < tau32 for row in values]
        # finite iff both models' scores are (a base log-prob of -inf at y0 alone is legitimate: floored in Eq. 7)
        finite = all(math.isfinite(row[0]) and (math.isfinite(row[1]) or row[1] == -math.inf) for row in values)
        if not finite:
            finite = (rl0 + base0.clamp(min=LOG_TINY)).squeeze(-1)
        if rows <= 8:
            mass = _indicator(tuple(fire), rl.device)
        else:
            mass = torch.tensor(fire, dtype=torch.float32, device=rl.device)
        fired = [i for i, f in enumerate(fire) if f]
        if not fired:  # the common case: no row is replaced, the scores are log p
            return FastStep(log_p, mass, None, True, finite)
        if len(fired) == rows:
            return FastStep(torch.log_softmax(_extrapolated(config, rl, base, ws), dim=-1), mass, None, True, finite)
        # log p is a fresh tensor here (never the caller's): overwrite the replaced rows with log r
        index = torch.tensor(fired, device=rl.device)
        ext = _extrapolated(config, rl.index_select(0, index), base.index_select(0, index), _Fresh())
        return FastStep(log_p.index_copy_(0, index, torch.log_softmax(ext, dim=-1)), mass, None, True, finite)
    else:
        if config.criterion == "random":
            fire = (torch.rand(rows, device=rl.device, generator=generator) < tau).unsqueeze(-1)
        else:
            fire = _difference(config, rl0, base0) < tau
        finite = (rl0 + base0.clamp(min=LOG_TINY)).squeeze(-1)
        mass = fire.squeeze(-1).float()
    log_r = torch.log_softmax(_extrapolated(config, rl, base, ws), dim=-1, out=ws("redraw", rl))
    return FastStep(torch.where(fire, log_r, log_p), mass, None, True, finite)
