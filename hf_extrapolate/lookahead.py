"""Lookahead decoding: the proposal model drafts k tokens, the other model checks them in one forward — exact.

One round, for every row at once:

1. the proposal model (its own KV cache, one token at a time) drafts `y_1..y_n ~ p` (`n <= k`);
2. the other model scores the n positions in ONE forward over `[last token, y_1..y_{n-1}]`;
3. the step distribution of `hf_extrapolate.directional` is computed at the n positions (`normalize_pair`,
   `proposal_and_replacement`, `criteria.fires` via `directional_step_with_replacement`); at the first position j
   where the criterion fires (token-level `logp_diff` on the drafted `y_j`; position-level from the two
   distributions; `random` with one uniform per position) the row emits a redraw `z_j ~ r_j` (greedy:
   `argmax r_j`) and drops `y_{j+1..n}`; if none fires it keeps all n drafts.

Each emitted token then has exactly the distribution of the step-by-step process given its prefix: a kept draft is
a draw from p on which the criterion did not fire, a redraw is a draw from r where it fired, and the dropped drafts
were never looked at by anything that is kept. Greedy decoding is the same with argmax.

Early stop (`early_stop_rule`): when the criterion's firing is decided without the other model (`random` in
sampling mode, with the round's uniforms drawn before its drafts; `always` / `never`; `entropy` with the base proposing,
`rl_entropy` with the RL model proposing, from the proposer's logits), drafting stops once every row has reached its
first fired position: a round drafts n = the max of the rows' needs instead of k, and the draft at a fired position is
never drawn. At batch > 1 a round can instead stop at the first fire of any row (`stop_any`): every row then emits all
n positions. Either stop is a stopping time of what the round has drawn so far, and the round still applies the fire
decisions computed from both models (the same ones), so the distribution is unchanged.

Rows go at their own pace: the n new cache slots are attended by a row only up to its accepted prefix (the rest are
masked out in both caches, and position ids continue from the accepted count); trailing slots that no row accepted
are cropped, so at batch 1 the caches simply roll back.

What it does not do: beam search, assisted decoding, logits processors other than the directional step and the
fused LoRA strategy (a LoRA pair runs the fallback strategy: the adapter toggled off for the base forwards).
`DirectionalModelForCausalLM.generate(..., lookahead=k)` and `custom_generate/` are the entry points.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .adaptive_k import AdaptiveLookahead, default_stop_any
from .cache_compat import cache_kwargs
from .config import ExtrapolationConfig
from .criteria import fires
from .directional import _view_fire_weight, directional_step_with_replacement, normalize_pair, shown_to_proposal
from .distributions import NEG_INF, entropy, warp_logprobs
from .processor import shared_vocab_size
from .statistics import generated_mask

logger = logging.getLogger(__name__)

# generation settings that add logits processors or change the decoding method: refused with lookahead
_REFUSED_SETTINGS = {
    "repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None),
    "min_length": (0, None),
    "min_new_tokens": (0, None),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "encoder_repetition_penalty": (1.0, None),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (False, None),
    "penalty_alpha": (None,),
    "output_attentions": (False, None),
    "output_hidden_states": (False, None),
}


def check_lookahead(lookahead: Any) -> int | str:
    """`lookahead` as given: a positive int, or "auto" (k chosen per round, `hf_extrapolate.adaptive_k`)."""
    if lookahead == "auto" and isinstance(lookahead, str):
        return "auto"
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(
            f"`lookahead` (={lookahead!r}) must be a positive int (the number of tokens the proposal model drafts per "
            "round, e.g. 8) or \"auto\" (k chosen per round from the observed fire rate); omit it for step-by-step "
            "decoding."
        )
    return lookahead


class _Forward:
    """One model with its own DynamicCache, fed explicit attention masks and position ids."""

    def __init__(self, model: Any, context: Callable[[], Any] | None):
        self.model = model
        self.context = context or contextlib.nullcontext
        self.cache = DynamicCache(config=getattr(model, "config", None))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        with self.context():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(self.cache), use_cache=True,
                logits_to_keep=keep,
            )
        return out.logits

    def crop(self, length: int) -> None:
        drop = self.cache.get_seq_length() - length
        if drop > 0:
            self.cache.crop(-drop)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def sample_from_logprobs(log_p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from `softmax(log_p)` by inversion of the cumulative distribution, in float64.
    log_p: (B, V) log-probabilities. Returns (B,) long.

    The same distribution as `torch.multinomial(log_p.exp(), 1)` (one uniform per row), at a twentieth of its cost
    on CPU for a 32k vocabulary; a token of probability 0 is never drawn.
    """
    probs = log_p.exp()
    cum = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)
    idx = torch.searchsorted(cum, u * cum[:, -1:], right=True).clamp(max=probs.shape[-1] - 1)
    # u * total can round up to the total: then the last token, which may have probability 0, is replaced
    return torch.where(probs.gather(-1, idx) > 0, idx, probs.argmax(-1, keepdim=True)).squeeze(-1)


def fires_at_drafts(
    rl_scores: torch.Tensor, base_scores: torch.Tensor, drafts: torch.Tensor, config: ExtrapolationConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whether the criterion fires when the drafted token is `drafts`, for a deterministic criterion (not
    `random`), and the replaced mass M of the position. rl_scores, base_scores: (N, V) logits; drafts: (N,).
    Returns `(fire (N,) bool, M (N,) float or None)`; M is None with `view_top_k` (use the full step for it).

    Token-level criteria read the drafted token; position-level ones (and always / never) do not, except with
    `view_top_k`, where the proposal's view shows the drawn token (the reference code's step).
    """
    rl, base = normalize_pair(rl_scores, base_scores)
    y = drafts.reshape(-1, 1).clamp(max=rl.shape[-1] - 1)
    if config.view_top_k is not None:
        k = min(config.view_top_k, rl.shape[-1])
        prop, other = (rl, base) if config.proposal == "rl" else (base, rl)
        other_seen = shown_to_proposal(other, k)
        rl_seen, base_seen = (rl, other_seen) if config.proposal == "rl" else (other_seen, base)
        top_idx = prop.topk(k, dim=-1).indices
        in_top = torch.zeros_like(prop, dtype=torch.bool).scatter_(-1, top_idx, True)
        weight = _view_fire_weight(rl_seen, base_seen, rl, base, config, top_idx, in_top)
        return weight.expand_as(rl).gather(-1, y).squeeze(-1) > 0.5, None
    mask = fires(config.criterion, config.threshold, rl, base, config.proposal)  # (N, V) or (N, 1)
    if mask.shape[-1] == 1:  # position-level and constant criteria: M is the 0/1 indicator
        fire = mask.squeeze(-1)
        return fire, fire.float()
    proposal = base if config.proposal == "base" else rl
    log_p = warp_logprobs(proposal, config.temperature, config.top_k, config.top_p, normalized=True)
    return mask.gather(-1, y).squeeze(-1), (log_p.exp() * mask).sum(-1)


def early_stop_rule(config: ExtrapolationConfig, greedy: bool) -> str | None:
    """How a round's drafting can stop at each row's first fired position without the other model, or None.

    - "random": sampling with `random`: the fire decisions are i.i.d. Bernoulli(threshold), independent of the
      tokens, so one uniform per position is drawn before drafting (greedy `random` fires on `mass`: None);
    - "always" / "never": constant;
    - "entropy": a position-level criterion on the proposal's own distribution (`entropy` = H(pi_base) with the base
      proposing, `rl_entropy` = H(pi_rl) with the RL model proposing), read from the proposer's logits.
    None for `view_top_k`, token-level criteria and criteria that need both distributions.
    """
    if config.view_top_k is not None:
        return None
    criterion = config.criterion
    if criterion == "random":
        return None if greedy else "random"
    if criterion in ("always", "never"):
        return criterion
    if (criterion, config.proposal) in (("entropy", "base"), ("rl_entropy", "rl")):
        return "entropy"
    return None


def stop_position(fire: torch.Tensor, remaining: torch.Tensor, stop_any: bool) -> int:
    """The positions n an early-stopping round drafts when its fire decisions are known before drafting.
    fire: (R, K) bool, row r fires at position i; remaining: (R,) tokens each row may still emit. Returns n in 1..K.

    A row drafts until its first fired position or its budget, whichever comes first; the round stops when no row
    is still drafting, or with `stop_any` at the first position where a row that was still drafting fires (or at
    K). One read-back, instead of one per draft.
    """
    rows, k = fire.shape
    steps = torch.arange(1, k + 1, device=fire.device)
    # still drafting after position i: no fire up to i, and budget for position i + 1
    after = (~fire).long().cumprod(-1).bool() & (remaining[:, None] > steps)
    stop = ~after.any(0)
    if stop_any:
        before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)
        stop = stop | (fire & before).any(0)
    stop[-1] = True
    return int(stop.long().argmax()) + 1


def _clock(device: torch.device) -> float:
    """Seconds for timing a round's phases: process CPU time on CPU (steady on a shared host), the wall clock after a
    synchronisation on an accelerator (only `lookahead="auto"` times anything)."""
    if device.type == "cpu":
        return time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def lookahead_decode(
    rl_model: Any,
    base_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: ExtrapolationConfig,
    *,
    lookahead: int | str,
    do_sample: bool,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    base_context: Callable[[], Any] | None = None,
    vocab_size: int | None = None,
    stopping_criteria: Any = None,
    streamer: Any = None,
    output_scores: bool = False,
    output_logits: bool = False,
    output_posterior: bool = True,
    generator: torch.Generator | None = None,
    chooser: AdaptiveLookahead | None = None,
    early_stop: bool = True,
    stop_any: bool | None = None,
) -> dict[str, Any]:
    """Exact lookahead decoding of the directional step distribution. Returns a dict with
    `sequences` (R, P + T), `scores` / `logits` (tuples of (R, V) per generated position, or None),
    `mass` (R, T) the replaced mass M of every generated position, `posterior` (R, T) the probability that the token
    was a redraw (`M r(y) / q(y)`; 0/1 greedy; zeros with `output_posterior=False`, which skips computing it) and
    `stats` (rounds, drafted, accepted, `k`: the positions of every round, `stop_any`: the rounds run with the
    any-row stop on, whether or not a row fired in them).

    `input_ids` (R, P) left-padded with `attention_mask` (R, P); `base_context` wraps every base forward (the LoRA
    fallback turns the adapter off in it). Temperature / top-k / top-p are `config`'s (applied inside).
    `lookahead` is k, or "auto" to choose k per round (`hf_extrapolate.adaptive_k`) with `chooser` (a new one when
    None; pass the same one to later calls to reuse its measured costs).

    `early_stop` (default True): for a criterion whose firing is decided without the other model
    (`early_stop_rule`), a round stops drafting once every row has reached its first fired position (or its
    budget): n is then the max of the rows' needs rather than k, the draft at a fired position is never drawn, and
    the check covers the n positions. The stop is a stopping time of what the round has drawn so far (the fire
    decisions at the drafted positions are the same ones the round then uses), so the output distribution is the
    same; False drafts k every round (the plain path, for comparisons). At batch > 1 an early-stopping round can
    also stop at the first position where ANY row fires (`stop_any`): every row then emits all n positions (n - 1
    drafts and its redraw, or n drafts) and no draft is dropped, at the price of more checks. None chooses per round
    (`AdaptiveLookahead.plan` with "auto"; `adaptive_k.default_stop_any` at the fire rate so far with a fixed k);
    True / False force it.
    """
    k_arg = check_lookahead(lookahead)
    if k_arg == "auto":
        chooser = chooser if chooser is not None else AdaptiveLookahead()
        chooser.start()
    else:
        chooser = None
    k_max = chooser.k_max if chooser is not None else int(k_arg)
    device = input_ids.device
    total_rows, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(device).long()
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("`attention_mask` ends with padding: lookahead decoding needs left-padded prompts.")
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).flatten()
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None and eos.numel() else 0
    greedy = not do_sample
    # the math over all drafted positions is needed for the scores / posterior, and for a criterion that reads the
    # distributions; `random` sampling without them needs the redraw distribution at the fired positions only
    has_stopping = stopping_criteria is not None and len(stopping_criteria) > 0
    # the step distribution log q over all drafted positions is needed for the scores / posterior / stopping
    # criteria, and in greedy mode; otherwise a round computes the fire decisions and M (nothing for `random`) and
    # the redraw distribution at each row's first fired position only
    full_math = output_scores or output_posterior or has_stopping or greedy or config.view_top_k is not None
    rule = early_stop_rule(config, greedy) if early_stop else None
    seen_fires, seen_positions = 1.0, 20.0  # the fire rate so far (prior 5% over 20 positions): fixed k's stop rule
    rl_runner = _Forward(rl_model, None)
    base_runner = _Forward(base_model, base_context)
    proposer, checker = (base_runner, rl_runner) if config.proposal == "base" else (rl_runner, base_runner)

    # the caches hold all but the last prompt token (the "pending" token, fed at the start of a round): the proposer
    # is prefilled with the whole prompt (its logits there are the first draft's), the checker reads all but the last
    # prompt token in its first check forward (one forward fewer for each)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    first_logits = proposer(input_ids, mask, positions, keep=1)[:, -1]
    check_prefix = (input_ids[:, :-1], positions[:, :-1]) if prompt_len > 1 else None
    # per active row (rows that are done leave the batch and the caches): the global row, the cache slots it
    # attends, its pending token and that token's position id, its emitted count
    active = torch.arange(total_rows, device=device)
    slot_mask = mask[:, :-1]
    pending = input_ids[:, -1]
    next_pos = positions[:, -1].clone()
    count = torch.zeros(total_rows, dtype=torch.long, device=device)

    emitted = torch.full((total_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    final_count = torch.zeros(total_rows, dtype=torch.long, device=device)
    rl_size = rl_model.get_output_embeddings().weight.shape[0]
    # the token range both models are compared on (padded embedding matrices): drafts come from it only
    shared = shared_vocab_size(rl_size, base_model.get_output_embeddings().weight.shape[0], vocab_size)
    mass_out = torch.zeros(total_rows, max_new_tokens, device=device)
    post_out = torch.zeros(total_rows, max_new_tokens, device=device)
    scores_out: list | None = [] if output_scores else None  # per round: (row index, position, (m, V) values)
    logits_out: list | None = [] if output_logits else None
    stats: dict[str, Any] = {"rounds": 0, "drafted": 0, "accepted": 0, "k": [], "stop_any": 0}
    ar = torch.arange(k_max, device=device)
    if streamer is not None:
        if total_rows > 1:
            raise ValueError("Streamers support only batch size 1 (one row, num_return_sequences=1).")
        streamer.put(input_ids.cpu())

    while max_new_tokens > 0 and active.numel() > 0:
        rows = active.numel()
        remaining = max_new_tokens - count
        if chooser is not None:
            k, any_fire_stops = chooser.plan(rows, early_stop=rule is not None)
        else:
            k = k_max
            any_fire_stops = rule is not None and default_stop_any(seen_fires / seen_positions, k_max, rows)
        if stop_any is not None:
            any_fire_stops = rule is not None and rows > 1 and stop_any
        n = n_cap = int(min(k, int(remaining.max())))
        slots = slot_mask.shape[1]
        # 1. draft up to n tokens from p, one proposal forward each; with an early-stop rule, stop once no row is
        # still drafting (each row drafts up to its first fired position or its budget, whichever comes first), or
        # with `stop_any` at the first position where any row fires (then every row emits all n positions)
        if chooser is not None:
            t0 = _clock(device)
        if rule == "random":  # the round's fire decisions, drawn before its drafts (those past the stop are unused)
            uniforms = torch.rand((rows, n_cap), device=device, generator=generator)
        # fire decisions known before drafting (`random`, always / never): the stop is planned with one read-back;
        # `entropy` reads each position's proposer logits, so it decides as the drafts come
        planned = None
        if rule in ("random", "always", "never"):
            known = (uniforms < config.threshold if rule == "random" else
                     torch.full((rows, n_cap), rule == "always", dtype=torch.bool, device=device))
            planned = stop_position(known, remaining, any_fire_stops)
        drafting = torch.ones(rows, dtype=torch.bool, device=device)
        deferred = None  # log p at the last position when its draft is drawn only if a row keeps it
        tokens = [pending]
        prop_logits = []
        for i in range(n_cap):
            step_mask = torch.cat([slot_mask, slot_mask.new_ones(rows, i + 1)], dim=1)
            if first_logits is not None:  # round 1: the proposer has read the pending token in its prefill
                logits, first_logits = first_logits, None
            else:
                logits = proposer(tokens[-1][:, None], step_mask, (next_pos + i)[:, None], keep=1)[:, -1]
            prop_logits.append(logits)
            raw = torch.log_softmax(logits[:, :shared].float(), dim=-1)
            log_p = warp_logprobs(raw, config.temperature, config.top_k, config.top_p, normalized=True)
            if rule is not None:
                if planned is not None:
                    stop = i + 1 == planned
                else:  # H of the proposal's raw distribution, as `criteria.position_metric`
                    fire_i = entropy(raw) > config.threshold
                    fired_now = bool((fire_i & drafting).any()) if any_fire_stops else False
                    drafting = drafting & ~fire_i & (remaining > i + 1)
                    stop = i + 1 == n_cap or fired_now or not bool(drafting.any())
                if stop:
                    n, deferred = i + 1, log_p
                    tokens.append(torch.zeros_like(pending))  # placeholder, drawn below where a row keeps it
                    break
            tokens.append(log_p.argmax(-1) if greedy else sample_from_logprobs(log_p, generator))
        drafts = torch.stack(tokens[1:], dim=1)  # (rows, n)
        fed = torch.stack(tokens[:n], dim=1)  # (rows, n): pending, y_1..y_{n-1}
        # 2. the other model scores the n positions in one forward
        if chooser is not None:
            t1 = _clock(device)
        new_mask = torch.cat([slot_mask, slot_mask.new_ones(rows, n)], dim=1)
        fed_pos = next_pos[:, None] + ar[:n]
        if check_prefix is not None:  # round 1: the prompt's first P - 1 tokens too
            fed, fed_pos = torch.cat([check_prefix[0], fed], dim=1), torch.cat([check_prefix[1], fed_pos], dim=1)
        check_logits = checker(fed, new_mask, fed_pos, keep=n)  # (rows, n, V)
        prop = torch.stack(prop_logits, dim=1)
        rl_l, base_l = (check_logits, prop) if config.proposal == "base" else (prop, check_logits)
        rl_flat = rl_l[..., :shared].reshape(rows * n, shared)
        base_flat = base_l[..., :shared].reshape(rows * n, shared)
        # 3. where the criterion fires, and the step distribution at the n positions
        if full_math:
            out, mass, log_r = directional_step_with_replacement(
                rl_flat, base_flat, config, greedy=greedy, generator=generator
            )
        if greedy:
            fire = mass > 0.5
        elif config.criterion == "random":
            if rule == "random":
                fire = uniforms[:, :n].reshape(-1) < config.threshold
            else:
                fire = torch.rand(rows * n, device=device, generator=generator) < config.threshold
            if not full_math:
                mass = torch.full((rows * n,), config.threshold, device=device)
        else:
            fire, lean_mass = fires_at_drafts(rl_flat, base_flat, drafts.reshape(-1), config)
            if not full_math:
                mass = lean_mass
        fire = fire.view(rows, n)
        any_fire = fire.any(-1)
        first = torch.where(any_fire, fire.float().argmax(-1), torch.full_like(pending, n))  # (rows,)
        accepted = torch.where(any_fire, first + 1, first)  # emitted tokens this round
        if deferred is not None and bool(((first == n) & (remaining >= n)).any()):
            # a row keeps its last draft: draw it now (the fire decisions do not depend on it: position-level)
            drafts[:, n - 1] = deferred.argmax(-1) if greedy else sample_from_logprobs(deferred, generator)
        # the redraw at the first fired position of each row
        idx = torch.arange(rows, device=device) * n + first.clamp(max=n - 1)
        if not full_math:
            _, _, log_r_first = directional_step_with_replacement(rl_flat[idx], base_flat[idx], config)
        else:
            log_r_first = out[idx] if greedy else log_r[idx]
        redraw = log_r_first.argmax(-1) if greedy else sample_from_logprobs(log_r_first, generator)
        new_tokens = torch.where(ar[:n] == first[:, None], redraw[:, None], drafts)  # first == n: no redraw
        # posterior that the emitted token is a redraw, and the scores of every position
        if greedy:
            posterior = mass
        elif output_posterior:
            chosen = new_tokens.reshape(-1, 1).clamp(max=shared - 1)
            log_post = mass.log() + (log_r.gather(-1, chosen) - out.gather(-1, chosen)).squeeze(-1)
            posterior = log_post.exp().nan_to_num(0.0).clamp(0.0, 1.0)
        else:
            posterior = torch.zeros_like(mass)
        mass, posterior = mass.view(rows, n), posterior.view(rows, n)
        if full_math:
            if shared < rl_size:
                out = torch.cat([out, out.new_full((out.shape[0], rl_size - shared), NEG_INF)], dim=-1)
            out = out.view(rows, n, -1)
        else:
            out = None

        # 4. emit per row: budget, EOS and stopping criteria
        take = torch.minimum(accepted, max_new_tokens - count)
        if eos is not None:
            is_eos = torch.isin(new_tokens, eos) & (ar[:n] < take[:, None])
            has_eos = is_eos.any(-1)
            take = torch.where(has_eos, is_eos.float().argmax(-1) + 1, take)
        else:
            has_eos = torch.zeros_like(any_fire)
        if has_stopping:
            take, stopped = _apply_stopping(stopping_criteria, input_ids[active], emitted[active], count, new_tokens,
                                            out, take)
            has_eos = has_eos | stopped
        keep = ar[:n] < take[:, None]  # (rows, n) emitted this round
        row_idx, col_idx = keep.nonzero(as_tuple=True)
        global_idx = active[row_idx]
        dest = count[row_idx] + col_idx
        emitted[global_idx, dest] = new_tokens[row_idx, col_idx]
        mass_out[global_idx, dest] = mass[row_idx, col_idx]
        post_out[global_idx, dest] = posterior[row_idx, col_idx]
        if scores_out is not None:
            scores_out.append((global_idx, dest, out[row_idx, col_idx]))
        if logits_out is not None:
            logits_out.append((global_idx, dest, rl_l[row_idx, col_idx].float()))
        if streamer is not None and int(take[0]) > 0:
            streamer.put(new_tokens[0, : int(take[0])].cpu())
        stats["rounds"] += 1
        stats["drafted"] += rows * n
        stats["accepted"] += int(take.sum())
        stats["k"].append(n)
        stats["stop_any"] += int(any_fire_stops)
        checked = int(torch.minimum(first + 1, torch.full_like(first, n)).sum())  # positions up to each first fire
        if chooser is not None:  # the check's cost includes the round's step math and bookkeeping; round 1's
            # times include the prefills: only its fire counts are used
            timed = check_prefix is None
            t2 = _clock(device)
            chooser.observe(checked, int(any_fire.sum()), n, t1 - t0 if timed else None, t2 - t1 if timed else None,
                            rows)
        seen_fires += int(any_fire.sum())
        seen_positions += checked
        check_prefix = None
        count = count + take
        done = has_eos | (count >= max_new_tokens)

        # 5. roll back: slots of the accepted prefix stay attended, the rest are masked out or cropped; rows that
        # are done leave the batch (and both caches)
        if bool(done.any()):
            final_count[active[done]] = count[done]
            live = (~done).nonzero().squeeze(-1)
            if live.numel() == 0:
                break
            for runner in (rl_runner, base_runner):
                runner.select_rows(live)
            active, count, slot_mask = active[live], count[live], slot_mask[live]
            accepted, new_tokens, next_pos = accepted[live], new_tokens[live], next_pos[live]
        width = int(accepted.max())
        slot_mask = torch.cat([slot_mask, (ar[:width] < accepted[:, None]).long()], dim=1)
        for runner in (rl_runner, base_runner):
            runner.crop(slots + width)
        pending = new_tokens.gather(1, (accepted - 1)[:, None]).squeeze(-1)
        next_pos = next_pos + accepted

    if streamer is not None:
        streamer.end()
    length = int(final_count.max()) if total_rows else 0
    sequences = torch.cat([input_ids, emitted[:, :length]], dim=1)
    return {
        "sequences": sequences,
        "scores": _per_position(scores_out, total_rows, length, pad_token_id, rl_size, True) if output_scores else None,
        "logits": _per_position(logits_out, total_rows, length, pad_token_id, rl_size, False) if output_logits else None,
        "mass": mass_out[:, :length],
        "posterior": post_out[:, :length],
        "stats": stats,
    }


def _apply_stopping(criteria, input_ids, emitted, count, new_tokens, out, take):
    """User stopping criteria, row by row and token by token: (take, stopped) with `take` cut after a stop."""
    take, stopped = take.clone(), torch.zeros_like(take, dtype=torch.bool)
    for b in range(take.shape[0]):
        c = int(count[b])
        for j in range(int(take[b])):
            seq = torch.cat([input_ids[b], emitted[b, :c], new_tokens[b, : j + 1]])[None]
            scores = out[b, j : j + 1] if out is not None else None
            if bool(criteria(seq, scores).any()):
                take[b], stopped[b] = j + 1, True
                break
    return take, stopped


def _per_position(chunks: list, rows: int, length: int, pad: int, vocab: int, is_scores: bool):
    """Per-round (row index, position, values) chunks -> a tuple of `length` (R, V) tensors. Positions after a row
    ended hold a distribution with all its mass on the padding token (scores) or zeros (logits)."""
    width = chunks[0][2].shape[-1] if chunks else vocab
    full = torch.full((rows, length, width), NEG_INF if is_scores else 0.0)
    if is_scores:
        full[:, :, pad] = 0.0
    for row_idx, dest, values in chunks:
        full[row_idx.cpu(), dest.cpu()] = values.cpu()
    full = full.to(chunks[0][2].device) if chunks else full
    return tuple(full[:, t] for t in range(length))


def lookahead_generate(
    pair: Any,
    inputs: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    logits_processor: Any,
    extrapolation_config: ExtrapolationConfig | None,
    *,
    lookahead: int,
    **kwargs: Any,
):
    """`DirectionalModelForCausalLM.generate(..., lookahead=k)`: resolve generate's arguments, run
    `lookahead_decode`, and return what `generate` returns (a tensor, or a `GenerateDecoderOnlyOutput` carrying
    `replace_ratio` and `replaced_token_probability` with `return_dict_in_generate=True`)."""
    k = check_lookahead(lookahead)
    if logits_processor:
        raise ValueError(
            "`logits_processor` cannot be combined with `lookahead`: lookahead decoding computes the directional step "
            "itself. Drop `lookahead` (step-by-step) or the processors."
        )
    cfg = extrapolation_config if extrapolation_config is not None else pair.extrapolation_config
    if not isinstance(cfg, ExtrapolationConfig):
        raise TypeError(f"`extrapolation_config` must be an ExtrapolationConfig, got {type(cfg).__name__}.")
    stopping_criteria = kwargs.pop("stopping_criteria", None)
    streamer = kwargs.pop("streamer", None)
    generator = kwargs.pop("generator", None)
    for name in ("assistant_model", "prompt_lookup_num_tokens", "prefix_allowed_tokens_fn", "negative_prompt_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(f"`{name}` cannot be combined with `lookahead`: use one or the other.")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(generation_config).__name__}.")
    gen = pair._resolve_generation_config(generation_config, kwargs)
    if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:  # as in generate: an explicit None never stops
        gen.eos_token_id = None
    kwargs = {key: value for key, value in kwargs.items() if not hasattr(gen, key)}  # the rest are model inputs
    cfg = _check_generation_config(gen, cfg)
    nrs = gen.num_return_sequences or 1
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("`lookahead` needs `input_ids` as a (batch, length) tensor.")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, gen)
    kwargs.pop("use_cache", None)
    if kwargs:
        raise ValueError(f"Unsupported argument(s) with `lookahead`: {sorted(kwargs)}.")
    max_new = gen.max_new_tokens
    if max_new is None:
        max_new = max(0, (gen.max_length or 20) - input_ids.shape[1])
    if nrs > 1:
        input_ids = input_ids.repeat_interleave(nrs, dim=0)
        attention_mask = attention_mask.repeat_interleave(nrs, dim=0) if attention_mask is not None else None

    return _run(pair, gen, cfg, input_ids, attention_mask, k, int(max_new), stopping_criteria, streamer, generator)


def _infer_attention_mask(input_ids: torch.Tensor, gen: GenerationConfig) -> torch.Tensor | None:
    """transformers' rule: padding tokens are masked when the pad token is not also the EOS token."""
    pad, eos = gen.pad_token_id, gen.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


def _check_generation_config(gen: GenerationConfig, cfg: ExtrapolationConfig) -> ExtrapolationConfig:
    """Refuse what lookahead decoding does not do; return `cfg` with generate's temperature / top-k / top-p."""
    from .modeling import UNSUPPORTED_WARPERS

    if (gen.num_beams or 1) > 1:
        raise ValueError(f"`num_beams` (={gen.num_beams}) > 1 cannot be combined with `lookahead`: beam search is not "
                         "lookahead decoding. Use num_beams=1 or drop `lookahead`.")
    if gen.prompt_lookup_num_tokens is not None or getattr(gen, "assistant_early_exit", None) is not None:
        raise ValueError("Assisted decoding cannot be combined with `lookahead`: use one or the other.")
    for name, neutral in UNSUPPORTED_WARPERS.items():
        if getattr(gen, name, neutral) not in (neutral, None):
            raise ValueError(f"`{name}` (={getattr(gen, name)}) is not supported with directional generation: only "
                             "temperature, top_k and top_p are applied inside each component. Unset it.")
    for name, neutral in _REFUSED_SETTINGS.items():
        value = getattr(gen, name, None)
        if value not in neutral:
            raise ValueError(f"`{name}` (={value!r}) is not supported with `lookahead`: unset it, or drop `lookahead` "
                             "for step-by-step decoding.")
    do_sample = bool(gen.do_sample)
    nrs = gen.num_return_sequences or 1
    if not do_sample and nrs > 1:
        raise ValueError(f"Greedy decoding without beam search does not support `num_return_sequences` (={nrs}) "
                         "different than 1; pass do_sample=True.")
    return cfg.replace(
        temperature=float(gen.temperature) if do_sample and gen.temperature is not None else 1.0,
        top_k=int(gen.top_k) if do_sample and gen.top_k else 0,
        top_p=float(gen.top_p) if do_sample and gen.top_p is not None else 1.0,
    )


def _run(pair, gen, cfg, input_ids, attention_mask, k, max_new, stopping_criteria, streamer, generator):
    """Run `lookahead_decode` for the pair and package the result as `generate` does."""
    do_sample = bool(gen.do_sample)
    if pair.is_lora_pair:
        from .peft_pair import _tuner_layers, adapter_disabled

        if pair.lora_strategy == "fused":
            raise ValueError(
                "lora_strategy='fused' cannot be combined with `lookahead`: the fused strategy runs both models on "
                "the same position (the batch doubled), lookahead runs them on different positions (drafts, then "
                "one check). Use lora_strategy='auto' or 'fallback' (what lookahead runs), or drop `lookahead`."
            )
        layers = _tuner_layers(pair.rl_model)
        base_model, base_context = pair.rl_model, (lambda: adapter_disabled(layers))
        strategy = "fallback"
    else:
        base_model, base_context = pair._reference_model, None
        strategy = "separate"
    pair.last_lora_strategy = strategy
    result = lookahead_decode(
        pair.rl_model, base_model, input_ids, attention_mask, cfg, lookahead=k, do_sample=do_sample,
        max_new_tokens=max_new, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
        base_context=base_context, vocab_size=pair.vocab_size, stopping_criteria=stopping_criteria, streamer=streamer,
        output_scores=bool(gen.return_dict_in_generate and gen.output_scores),
        output_logits=bool(gen.return_dict_in_generate and gen.output_logits),
        output_posterior=bool(gen.return_dict_in_generate), generator=generator,
        chooser=_chooser(pair, k, input_ids),
    )
    sequences = result["sequences"]
    prompt_len = input_ids.shape[1]
    valid = generated_mask(sequences, prompt_len, gen.eos_token_id)
    ratio = (result["mass"] * valid).sum(-1) / valid.sum(-1)
    pair.last_replace_ratio = ratio
    pair.last_processor = None
    pair.last_lookahead_stats = copy.copy(result["stats"])
    if not gen.return_dict_in_generate:
        return sequences
    out = GenerateDecoderOnlyOutput(sequences=sequences, scores=result["scores"], logits=result["logits"])
    out["replace_ratio"] = ratio
    out["replaced_token_probability"] = result["posterior"].masked_fill(~valid, float("nan"))
    out["lora_strategy"] = strategy
    return out


def _chooser(pair: Any, k: int | str, input_ids: torch.Tensor) -> AdaptiveLookahead | None:
    """For `lookahead="auto"`: the pair's chooser for this batch size and device (it keeps the measured costs)."""
    if k != "auto":
        return None
    choosers = pair._lookahead_choosers
    key = (input_ids.shape[0], str(input_ids.device))
    if key not in choosers:
        choosers[key] = AdaptiveLookahead()
    return choosers[key]


# arguments transformers' generate passes to a `custom_generate` folder that the wrapper's generate does not take
_CUSTOM_DROPPED = ("synced_gpus", "tokenizer", "assistant_tokenizer")


def custom_generate_entry(
    model: Any,
    *,
    base_model: Any = None,
    extrapolation_config: ExtrapolationConfig | dict | None = None,
    lookahead: int | None = 8,
    lora_strategy: str = "auto",
    **generate_arguments: Any,
):
    """What `custom_generate/generate.py` runs: `DirectionalModelForCausalLM(model, base_model, ...).generate(...)`.

    `generate_arguments` are those of transformers' `generate` (unset ones arrive as None and are dropped).
    """
    from .modeling import DirectionalModelForCausalLM

    if isinstance(extrapolation_config, dict):
        extrapolation_config = ExtrapolationConfig.from_dict(extrapolation_config)
    if base_model is None and not hasattr(model, "peft_config"):
        raise ValueError(
            "custom_generate (hf_extrapolate) needs `base_model=`: pass the base model the RL model was tuned from "
            "(or call it on a PEFT model, whose adapter-off weights are the base)."
        )
    pair = DirectionalModelForCausalLM(model, base_model, extrapolation_config, lora_strategy=lora_strategy)
    for name in _CUSTOM_DROPPED:
        generate_arguments.pop(name, None)
    kwargs = {name: value for name, value in generate_arguments.items() if value is not None}
    return pair.generate(lookahead=lookahead, **kwargs)


def lookahead_custom_generate(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    base_model: Any = None,
    extrapolation_config: ExtrapolationConfig | None = None,
    lookahead: int = 8,
    lora_strategy: str = "auto",
    **model_kwargs: Any,
):
    """A `custom_generate` callable: `rl_model.generate(**inputs, custom_generate=lookahead_custom_generate,
    base_model=base, lookahead=8, ...)` runs lookahead decoding on a plain model.

    transformers calls it after preparing generate's inputs (rows already repeated for `num_return_sequences`,
    `max_length` resolved, logits processors and stopping criteria built from the generation config). Temperature /
    top-k / top-p are read from the generation config and applied inside each component; any other logits processor
    is refused; the max-length and EOS criteria are handled natively, other stopping criteria are applied.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    from .modeling import DirectionalModelForCausalLM

    k = check_lookahead(lookahead)
    if synced_gpus:
        raise ValueError("`synced_gpus=True` is not supported with lookahead decoding.")
    warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    others = [type(p).__name__ for p in (logits_processor or []) if not isinstance(p, warpers)]
    if others:
        raise ValueError(f"Logits processors {others} cannot be combined with lookahead decoding (it computes the "
                         "directional step itself); unset the settings that create them.")
    if base_model is None and not hasattr(model, "peft_config"):
        raise ValueError("`base_model` is required: `generate(custom_generate=lookahead_custom_generate, "
                         "base_model=base, ...)` (a PEFT model without it uses its adapter-off weights).")
    pair = DirectionalModelForCausalLM(model, base_model, extrapolation_config, lora_strategy=lora_strategy)
    gen = copy.deepcopy(generation_config)
    gen.num_return_sequences = 1  # transformers has validated it and repeated the rows already
    cfg = _check_generation_config(gen, pair.extrapolation_config)
    attention_mask = model_kwargs.pop("attention_mask", None)
    for name in ("use_cache", "cache", "past_key_values", "logits_to_keep", "position_ids"):  # prepared by generate
        model_kwargs.pop(name, None)
    if model_kwargs:
        raise ValueError(f"Unsupported argument(s) with lookahead decoding: {sorted(model_kwargs)}.")
    kept = [c for c in (stopping_criteria or []) if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    max_new = max(0, int(gen.max_length) - input_ids.shape[1])
    return _run(pair, gen, cfg, input_ids, attention_mask, k, max_new, StoppingCriteriaList(kept), streamer, None)
