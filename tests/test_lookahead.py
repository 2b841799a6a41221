"""Lookahead decoding (`generate(..., lookahead=k)`) is the step-by-step directional process, exactly.

- greedy: the same tokens as the step-by-step path (every criterion but random, both proposals, left padding, EOS
  inside a draft, max_new_tokens not a multiple of k, a stopping criterion), with a fixed k and with k="auto";
- sampling: per-position scores equal a full recompute without cache, and the distribution of short continuations
  of a tiny-vocabulary pair equals exact enumeration (chi-square; a buggy lookahead sampler is rejected), for the
  role-relative token criteria, the reference code's top-k views (`view_top_k`) and k="auto" too;
- the draft sampler (inversion of the CDF) has the distribution it samples from;
- the LoRA pair: greedy tokens and sampled scores, and the strategy reported (fallback);
- errors for what it does not do.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_extrapolate import DirectionalModelForCausalLM, ExtrapolationConfig
from hf_extrapolate.criteria import position_metric, token_difference
from hf_extrapolate.directional import directional_step_with_replacement, normalize_pair, proposal_and_replacement
from hf_extrapolate.lookahead import sample_from_logprobs

from .tiny import EOS, PAD, left_padded_batch, tiny_llama

POSITION = ("entropy", "rl_entropy", "kl", "reverse_kl", "avg_kl")
PEAKY = dict(initializer_range=0.3)  # random models whose distributions differ enough for criteria to vary


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(0, **PEAKY), tiny_llama(1, **PEAKY)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch([5, 3, 7], seed=0)


def median_threshold(rl, base, criterion: str, batch, proposal: str = "base") -> float:
    """A threshold at the median of the criterion's metric over the prompt positions (so it fires about half);
    for `logp_diff` the metric is the log-ratio of the proposal's greedy token."""
    with torch.no_grad():
        l_rl = rl(**batch).logits.flatten(0, 1)
        l_b = base(**batch).logits.flatten(0, 1)
    rl_n, base_n = normalize_pair(l_rl, l_b)
    if criterion in TOKEN:
        y0 = (base_n if proposal == "base" else rl_n).argmax(-1, keepdim=True)
        return float(token_difference(criterion, rl_n, base_n, proposal).gather(-1, y0).median())
    return float(position_metric(criterion, rl_n, base_n).median())


TOKEN = ("logp_diff", "logp_other_minus_proposal", "logp_proposal_minus_other")


def configs(rl, base, batch, proposal):
    out = [("always", 0.0), ("never", 0.0)]
    return out + [(c, median_threshold(rl, base, c, batch, proposal)) for c in TOKEN + POSITION]


@pytest.mark.parametrize("proposal", ["base", "rl"])
def test_greedy_tokens_identical_to_step_by_step_every_criterion(pair, batch, proposal):
    rl, base = pair
    for criterion, tau in configs(rl, base, batch, proposal):
        cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.5)
        model = DirectionalModelForCausalLM(rl, base, cfg)
        ref = model.generate(**batch, do_sample=False, max_new_tokens=13)
        ref_ratio = model.last_replace_ratio
        for k in (5, "auto"):  # lookahead=1: test_greedy_scores_and_lookahead_1_equal_step_by_step
            out = model.generate(**batch, do_sample=False, max_new_tokens=13, lookahead=k)
            assert torch.equal(out, ref), (criterion, proposal, k)
            torch.testing.assert_close(model.last_replace_ratio, ref_ratio)
        if criterion not in ("always", "never"):  # the criterion varies along the rows: drafts are really dropped
            assert 0.0 < float(ref_ratio.mean()) < 1.0, (criterion, ref_ratio)


def test_greedy_scores_and_lookahead_1_equal_step_by_step(pair, batch):
    rl, base = pair
    model = DirectionalModelForCausalLM(rl, base, ExtrapolationConfig(threshold=-0.3, gamma=0.3))
    kw = dict(do_sample=False, max_new_tokens=9, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(**batch, **kw)
    for k in (1, 3):
        out = model.generate(**batch, **kw, lookahead=k)
        assert torch.equal(out.sequences, ref.sequences)
        for s_la, s_ref in zip(out.scores, ref.scores, strict=True):
            torch.testing.assert_close(s_la, s_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.replace_ratio, ref.replace_ratio)
        torch.testing.assert_close(out.replaced_token_probability, ref.replaced_token_probability, equal_nan=True)


def test_eos_inside_a_draft_and_rows_at_their_own_pace(pair, batch):
    rl, base = pair
    model = DirectionalModelForCausalLM(rl, base, ExtrapolationConfig(threshold=-0.3, proposal="rl"))
    free = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=None)
    prompt = batch["input_ids"].shape[1]
    eos = int(free[0, prompt + 2])  # row 0's third token: it ends inside the first draft of k=4
    ref = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    out = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD,
                         lookahead=4)
    assert torch.equal(out, ref)
    assert int(out[0, prompt + 2]) == eos and bool((out[0, prompt + 3 :] == PAD).all())


def test_stopping_criterion_and_streamer(pair):
    rl, base = pair
    prompt = left_padded_batch([4], seed=3)
    model = DirectionalModelForCausalLM(rl, base, ExtrapolationConfig(threshold=-0.3))
    free = model.generate(**prompt, do_sample=False, max_new_tokens=10, eos_token_id=None)
    stop_token = int(free[0, 4 + 4])

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten())

        def end(self):
            self.ended = True

    kw = dict(do_sample=False, max_new_tokens=10, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAt()]))
    ref = model.generate(**prompt, **kw)
    streamer = Collect()
    out = model.generate(**prompt, **kw, lookahead=3, streamer=streamer)
    assert torch.equal(out, ref) and out.shape[1] <= 4 + 5
    assert torch.equal(torch.cat(streamer.chunks), out[0]) and streamer.ended


def full_recompute_scores(rl, base, sequences, attention_mask, cfg, prompt_len, greedy=False):
    """log q at every generated position from one forward of each model over the whole sequence (no cache)."""
    mask = torch.cat([attention_mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        l_rl = rl(input_ids=sequences, attention_mask=mask, position_ids=pos).logits
        l_b = base(input_ids=sequences, attention_mask=mask, position_ids=pos).logits
    out = []
    for t in range(prompt_len - 1, sequences.shape[1] - 1):
        out.append(directional_step_with_replacement(l_rl[:, t], l_b[:, t], cfg, greedy=greedy)[0])
    return out


@pytest.mark.parametrize(
    "criterion,tau,proposal,k",
    [("logp_diff", -0.3, "base", 4), ("random", 0.3, "rl", 4), ("kl", None, "rl", 4), ("entropy", None, "base", 4),
     ("logp_proposal_minus_other", None, "rl", 4), ("logp_diff", -0.3, "rl", "auto"), ("random", 0.1, "rl", "auto")],
)
def test_sampled_scores_equal_full_recompute(pair, batch, criterion, tau, proposal, k):
    rl, base = pair
    if tau is None:
        tau = median_threshold(rl, base, criterion, batch, proposal)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.2)
    model = DirectionalModelForCausalLM(rl, base, cfg)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=11,
                         lookahead=k, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=2,
                         return_dict_in_generate=True, output_scores=True)
    mask = batch["attention_mask"].repeat_interleave(2, dim=0)
    prompt = batch["input_ids"].shape[1]
    assert out.sequences.shape[0] == 6 and len(out.scores) == out.sequences.shape[1] - prompt
    ref = full_recompute_scores(rl, base, out.sequences, mask, cfg.replace(temperature=0.8, top_k=40, top_p=0.9),
                                prompt)
    valid = ~out.replaced_token_probability.isnan()
    for t, (s, r) in enumerate(zip(out.scores, ref, strict=True)):
        rows = valid[:, t]
        torch.testing.assert_close(s[rows], r[rows], atol=1e-5, rtol=1e-5)
        tok = out.sequences[rows, prompt + t]
        assert bool(torch.isfinite(s[rows].gather(-1, tok[:, None])).all())  # every emitted token has q > 0


# ---------------------------------------------------------------------- exact distribution (tiny vocabulary)
SMALL_VOCAB, STEPS = 6, 3


def prefix_logits(rl, base, prompt):
    """(prefix, RL logits, base logits) at the last position for every prefix of up to STEPS-1 generated tokens."""
    for n in range(STEPS):
        for prefix in itertools.product(range(SMALL_VOCAB), repeat=n):
            if EOS in prefix:
                continue
            ids = torch.tensor([list(prompt) + list(prefix)])
            with torch.no_grad():
                yield prefix, rl(input_ids=ids).logits[:, -1], base(input_ids=ids).logits[:, -1]


def exact_tables(rl, base, prompt, cfg):
    """For every prefix of up to STEPS-1 generated tokens: (p, r, fire mask of `logp_diff` over tokens, q, M)."""
    tables = {}
    for prefix, l_rl, l_b in prefix_logits(rl, base, prompt):
        rl_n, base_n = normalize_pair(l_rl, l_b)
        log_p, log_r = proposal_and_replacement(rl_n, base_n, cfg)
        fire = (rl_n - base_n) < cfg.threshold
        log_q, mass, _ = directional_step_with_replacement(l_rl, l_b, cfg)
        tables[prefix] = (log_p[0].exp(), log_r[0].exp(), fire[0], log_q[0].exp(), float(mass[0]))
    return tables


def outcome(tokens) -> tuple:
    tokens = list(tokens)
    return tuple(tokens[: tokens.index(EOS) + 1]) if EOS in tokens else tuple(tokens)


def exact_distribution(tables) -> dict:
    probs = {}

    def walk(prefix, prob):
        if len(prefix) == STEPS or (prefix and prefix[-1] == EOS):
            probs[prefix] = probs.get(prefix, 0.0) + prob
            return
        q = tables[prefix][3]
        for y in range(SMALL_VOCAB):
            walk(prefix + (y,), prob * float(q[y]))

    walk((), 1.0)
    return probs


def buggy_lookahead_samples(tables, n, k, generator):
    """The classic bug: after a redraw, keep the later drafts (drawn after the dropped token)."""
    samples = []
    for _ in range(n):
        seq: tuple = ()
        while len(seq) < STEPS and EOS not in seq:
            drafts, prefix = [], seq
            for _ in range(min(k, STEPS - len(seq))):
                if EOS in prefix:
                    break
                y = int(torch.multinomial(tables[prefix][0], 1, generator=generator))
                drafts.append(y)
                prefix = prefix + (y,)
            out, prefix = [], seq
            for y in drafts:
                if EOS in prefix:
                    break
                p, r, fire, _, _ = tables[prefix]
                if bool(fire[y]):
                    y = int(torch.multinomial(r, 1, generator=generator))
                out.append(y)
                prefix = prefix + (y,)
            seq = seq + tuple(out)
        samples.append(outcome(seq[:STEPS]))
    return samples


def chi_square_pvalue(samples, probs) -> float:
    """Pearson chi-square of sample counts against exact probabilities (outcomes with expectation < 5 pooled)."""
    n = len(samples)
    counts: dict = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= set(probs), "a sample outside the support"
    big = [o for o in probs if probs[o] * n >= 5]
    small = [o for o in probs if probs[o] * n < 5]
    obs = [counts.get(o, 0) for o in big] + ([sum(counts.get(o, 0) for o in small)] if small else [])
    exp = [probs[o] * n for o in big] + ([sum(probs[o] for o in small) * n] if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.parametrize(
    "proposal,criterion,tau,view_top_k,k",
    [
        ("base", "logp_diff", -1.0, None, 2),
        ("rl", "logp_diff", -0.5, None, 2),
        ("rl", "logp_diff", -0.5, None, "auto"),
        ("base", "logp_proposal_minus_other", 1.2, None, 2),  # role-relative: fires on the drafted token
        ("base", "logp_diff", -1.0, 3, 2),  # the reference's views: the gate reads the shown values
        ("rl", "kl", 0.4, 3, 3),  # a position-level criterion on the views depends on the drawn token
    ],
)
def test_sampling_distribution_equals_exact_enumeration(proposal, criterion, tau, view_top_k, k):
    rl = tiny_llama(0, vocab_size=SMALL_VOCAB, **PEAKY)
    base = tiny_llama(1, vocab_size=SMALL_VOCAB, **PEAKY)
    prompt = (1, 4, 3)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.5, view_top_k=view_top_k)
    tables = exact_tables(rl, base, prompt, cfg)
    probs = exact_distribution(tables)
    fired = [t[4] for t in tables.values()]
    assert 0.1 < sum(fired) / len(fired) < 0.9  # the criterion fires often enough for the test to have power
    model = DirectionalModelForCausalLM(rl, base, cfg)
    n = 6000
    torch.manual_seed(1)
    out = model.generate(input_ids=torch.tensor([prompt]), do_sample=True, max_new_tokens=STEPS, lookahead=k,
                         num_return_sequences=n, eos_token_id=EOS, pad_token_id=PAD)
    samples = [outcome(row) for row in out[:, len(prompt):].tolist()]
    assert chi_square_pvalue(samples, probs) > 1e-3
    if criterion == "logp_diff" and view_top_k is None:
        # negative control: the same test rejects a lookahead sampler that keeps drafts after a redraw
        wrong = buggy_lookahead_samples(tables, n, 2, torch.Generator().manual_seed(2))
        assert chi_square_pvalue(wrong, probs) < 1e-6


def test_draft_sampler_has_the_distribution_it_samples_from():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.25, 0.05, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logprobs(probs.log().repeat_interleave(n, dim=0), g).view(2, n)
    assert bool((draws[1] == 3).all())
    assert bool((probs[0, draws[0]] > 0).all())  # a token of probability 0 is never drawn
    samples = [(int(y),) for y in draws[0]]
    exact = {(y,): float(probs[0, y]) for y in range(6) if probs[0, y] > 0}
    assert chi_square_pvalue(samples, exact) > 1e-3
    # negative control: the same counts reject a distribution 2 points off on two tokens
    wrong = {**exact, (0,): 0.48, (2,): 0.22}
    assert chi_square_pvalue(samples, wrong) < 1e-6


def test_max_new_tokens_not_a_multiple_of_k_sampling(pair, batch):
    rl, base = pair
    model = DirectionalModelForCausalLM(rl, base, ExtrapolationConfig(criterion="random", threshold=0.1, proposal="rl"))
    out = model.generate(**batch, do_sample=True, max_new_tokens=7, lookahead=4, eos_token_id=None)
    assert out.shape == (3, batch["input_ids"].shape[1] + 7)


def test_lora_pair_greedy_matches_step_by_step():
    from peft import LoraConfig, get_peft_model

    from hf_extrapolate.peft_pair import _tuner_layers

    base = tiny_llama(0, **PEAKY)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    model = DirectionalModelForCausalLM.from_peft(peft_model, ExtrapolationConfig(threshold=-0.05, proposal="rl"))
    layers = _tuner_layers(peft_model)
    before = [m._disable_adapters for m in layers]
    batch = left_padded_batch([4, 6], seed=1)
    ref = model.generate(**batch, do_sample=False, max_new_tokens=10)
    for k in (4, "auto"):
        out = model.generate(**batch, do_sample=False, max_new_tokens=10, lookahead=k)
        assert torch.equal(out, ref)
        assert model.last_lora_strategy == "fallback"
    assert [m._disable_adapters for m in layers] == before  # the adapter state is the user's: restored


class _AdapterOff:
    """The base of a LoRA pair for the full recompute: the PEFT model with its adapter disabled."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


def test_lora_pair_sampled_scores_equal_full_recompute_and_strategy_reported():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(0, **PEAKY), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    cfg = ExtrapolationConfig(threshold=-0.05, proposal="base", gamma=0.3)
    model = DirectionalModelForCausalLM.from_peft(peft_model, cfg)
    batch = left_padded_batch([4, 6], seed=1)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, top_p=0.9, max_new_tokens=9, lookahead=3, eos_token_id=EOS,
                         pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    assert out.lora_strategy == "fallback" and model.last_lora_strategy == "fallback"
    prompt = batch["input_ids"].shape[1]
    ref = full_recompute_scores(peft_model, _AdapterOff(peft_model), out.sequences, batch["attention_mask"],
                                cfg.replace(top_p=0.9), prompt)
    valid = ~out.replaced_token_probability.isnan()
    assert 0.0 < float(out.replace_ratio.mean()) < 1.0
    for t, (s, r) in enumerate(zip(out.scores, ref, strict=True)):
        torch.testing.assert_close(s[valid[:, t]], r[valid[:, t]], atol=1e-5, rtol=1e-5)
    fused = DirectionalModelForCausalLM.from_peft(peft_model, cfg, lora_strategy="fused")
    with pytest.raises(ValueError, match="lora_strategy='fused'"):
        fused.generate(**batch, max_new_tokens=3, lookahead=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lookahead=0), "`lookahead`"),
        (dict(lookahead="fast"), "`lookahead`"),
        (dict(lookahead=4, num_beams=2), "num_beams"),
        (dict(lookahead=4, prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
        (dict(lookahead=4, repetition_penalty=1.2), "repetition_penalty"),
        (dict(lookahead=4, min_p=0.1, do_sample=True), "min_p"),
    ],
)
def test_lookahead_refuses_what_it_does_not_do(pair, batch, kwargs, match):
    model = DirectionalModelForCausalLM(*pair)
    with pytest.raises(ValueError, match=match):
        model.generate(**batch, max_new_tokens=4, **kwargs)


def test_custom_generate_folder_and_callable_on_a_plain_model(pair, batch):
    from hf_extrapolate import CUSTOM_GENERATE_DIR
    from hf_extrapolate.lookahead import lookahead_custom_generate

    rl, base = pair
    cfg = ExtrapolationConfig(threshold=-0.3, proposal="rl", gamma=0.2)
    ref = DirectionalModelForCausalLM(rl, base, cfg).generate(**batch, do_sample=False, max_new_tokens=9)
    kw = dict(base_model=base, extrapolation_config=cfg, do_sample=False, max_new_tokens=9)
    folder = rl.generate(**batch, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, lookahead=4, **kw)
    assert torch.equal(folder, ref)
    step = rl.generate(**batch, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, lookahead=None, **kw)
    assert torch.equal(step, ref)
    call = rl.generate(**batch, custom_generate=lookahead_custom_generate, lookahead=4, **kw)
    assert torch.equal(call, ref)
    # sampling through the callable: transformers repeats the rows, the scores are log q (full recompute)
    torch.manual_seed(0)
    out = rl.generate(**batch, custom_generate=lookahead_custom_generate, base_model=base, extrapolation_config=cfg,
                      lookahead=3, do_sample=True, top_k=0, top_p=0.9, max_new_tokens=7, num_return_sequences=2,
                      return_dict_in_generate=True, output_scores=True)
    prompt = batch["input_ids"].shape[1]
    mask = batch["attention_mask"].repeat_interleave(2, dim=0)
    ref_scores = full_recompute_scores(rl, base, out.sequences, mask, cfg.replace(top_p=0.9), prompt)
    valid = ~out.replaced_token_probability.isnan()
    assert out.sequences.shape[0] == 6 and bool(valid[:, 0].all())
    for t, (s, r) in enumerate(zip(out.scores, ref_scores, strict=True)):
        torch.testing.assert_close(s[valid[:, t]], r[valid[:, t]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="base_model"):
        rl.generate(**batch, custom_generate=lookahead_custom_generate, lookahead=4, max_new_tokens=3)


def test_padded_vocabularies_draw_only_shared_tokens(batch):
    rl, base = tiny_llama(0, vocab_size=70, **PEAKY), tiny_llama(1, **PEAKY)  # the RL head is padded by 6 rows
    for proposal in ("base", "rl"):
        model = DirectionalModelForCausalLM(rl, base, ExtrapolationConfig(threshold=-0.3, proposal=proposal),
                                            vocab_size=64)
        ref = model.generate(**batch, do_sample=False, max_new_tokens=8)
        assert torch.equal(model.generate(**batch, do_sample=False, max_new_tokens=8, lookahead=3), ref)
        torch.manual_seed(0)
        out = model.generate(**batch, do_sample=True, max_new_tokens=8, lookahead=3, num_return_sequences=8,
                             return_dict_in_generate=True, output_scores=True)
        assert int(out.sequences.max()) < 64 and out.scores[0].shape[-1] == 70


# ---------------------------------------------------------------------- early stop of the drafts
# criteria decided without the other model (`early_stop_rule`): a round stops drafting at each row's first fired
# position; `early_stop=False` is the plain path (k drafts every round)
def _decode(rl, base, ids, mask, cfg, **kw):
    from hf_extrapolate.lookahead import lookahead_decode

    kw.setdefault("eos_token_id", None)
    kw.setdefault("pad_token_id", PAD)
    return lookahead_decode(rl, base, ids, mask, cfg, **kw)


def test_early_stop_rule_covers_only_criteria_decided_by_the_proposer():
    from hf_extrapolate.lookahead import early_stop_rule

    def rule(criterion, proposal="rl", greedy=False, view_top_k=None):
        cfg = ExtrapolationConfig(criterion=criterion, threshold=0.5, proposal=proposal, view_top_k=view_top_k)
        return early_stop_rule(cfg, greedy)

    assert rule("random") == "random" and rule("random", greedy=True) is None
    assert rule("always") == "always" and rule("never", greedy=True) == "never"
    assert rule("entropy", "base") == "entropy" and rule("rl_entropy", "rl") == "entropy"
    assert rule("entropy", "rl") is None and rule("rl_entropy", "base") is None  # the other model's entropy
    for criterion in ("kl", "reverse_kl", "avg_kl") + TOKEN:
        assert rule(criterion) is None and rule(criterion, "base") is None
    assert rule("random", view_top_k=3) is None and rule("entropy", "base", view_top_k=3) is None


@pytest.mark.parametrize("early_stop,stop_any", [(True, None), (True, True), (True, False), (False, None)])
@pytest.mark.parametrize(
    "criterion,tau,proposal,k",
    [("random", 0.3, "rl", 4), ("random", 0.2, "base", "auto"), ("entropy", None, "base", 4),
     ("rl_entropy", None, "rl", 5), ("always", 0.0, "rl", 3), ("never", 0.0, "base", 3)],
)
def test_early_stop_sampled_scores_equal_full_recompute(pair, batch, criterion, tau, proposal, k, early_stop,
                                                        stop_any):
    """Per-position values at batch 1 (where a round stops at the row's own first fire) and batch 3: log q at every
    emitted position equals a full recompute, M is the criterion's, every emitted token has q > 0."""
    rl, base = pair
    if tau is None:
        tau = median_threshold(rl, base, criterion, batch, proposal)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.2, top_p=0.9)
    prompt = batch["input_ids"].shape[1]
    drafted = 0
    cases = [(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1], s) for i in range(3) for s in (0, 1)]
    cases.append((batch["input_ids"], batch["attention_mask"], 2))
    for ids, mask, seed in cases:
        torch.manual_seed(seed)
        out = _decode(rl, base, ids, mask, cfg, lookahead=k, do_sample=True, max_new_tokens=11, output_scores=True,
                      early_stop=early_stop, stop_any=stop_any)
        assert out["sequences"].shape == (ids.shape[0], prompt + 11)
        if ids.shape[0] > 1 and early_stop and stop_any:  # every row emits every drafted position
            assert out["stats"]["stop_any"] == out["stats"]["rounds"]
            if criterion in ("random", "rl_entropy"):  # the fire decisions drafting stopped on are the round's
                assert out["stats"]["drafted"] == out["stats"]["accepted"]
        ref = full_recompute_scores(rl, base, out["sequences"], mask, cfg, prompt)
        for t, (s, r) in enumerate(zip(out["scores"], ref, strict=True)):
            torch.testing.assert_close(s, r, atol=1e-5, rtol=1e-5)
            tok = out["sequences"][:, prompt + t]
            assert bool(torch.isfinite(s.gather(-1, tok[:, None])).all())
        l_rl = torch.stack(full_recompute_logits(rl, out["sequences"], mask, prompt), 1).flatten(0, 1)
        l_b = torch.stack(full_recompute_logits(base, out["sequences"], mask, prompt), 1).flatten(0, 1)
        mass = directional_step_with_replacement(l_rl, l_b, cfg)[1].view(ids.shape[0], -1)
        torch.testing.assert_close(out["mass"], mass)  # M: tau for random, 0 / 1 for position-level
        if ids.shape[0] == 1:
            assert out["stats"]["drafted"] == sum(out["stats"]["k"])
            drafted += out["stats"]["drafted"]
    if criterion == "always" and early_stop:  # every position fires: one position per round
        assert drafted == 6 * 11
    if criterion == "never":
        assert drafted == 6 * 11  # nothing fires: a round drafts k (or the budget) and keeps them all


def full_recompute_logits(model, sequences, attention_mask, prompt_len):
    """The logits of `model` at every generated position (no cache): a list of (R, V)."""
    mask = torch.cat([attention_mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=pos).logits
    return [logits[:, t] for t in range(prompt_len - 1, sequences.shape[1] - 1)]


def test_early_stop_is_taken_at_batch_1():
    """random 0.3 at k = 8: the rounds draft up to the first fire (mean A(8) ~ 3.0 positions), not 8; the plain
    path drafts 8 (or the budget) every round."""
    rl, base = tiny_llama(0, **PEAKY), tiny_llama(1, **PEAKY)
    ids = left_padded_batch([5], seed=4)["input_ids"]
    cfg = ExtrapolationConfig(criterion="random", threshold=0.3, proposal="rl", gamma=0.2)
    torch.manual_seed(0)
    early = _decode(rl, base, ids, None, cfg, lookahead=8, do_sample=True, max_new_tokens=60, output_posterior=False)
    st = early["stats"]
    assert st["accepted"] == 60 and st["drafted"] == sum(st["k"])
    assert st["drafted"] < 0.6 * 8 * st["rounds"], st  # expected ~0.37 of 8 per round
    assert st["drafted"] == st["accepted"]  # every drafted position is emitted: a draft is never wasted
    torch.manual_seed(0)
    plain = _decode(rl, base, ids, None, cfg, lookahead=8, do_sample=True, max_new_tokens=60, output_posterior=False,
                    early_stop=False)["stats"]
    assert all(n == 8 for n in plain["k"][:-1]) and plain["drafted"] > plain["accepted"]


@pytest.mark.parametrize(
    "criterion,proposal", [("always", "rl"), ("never", "base"), ("entropy", "base"), ("rl_entropy", "rl")]
)
def test_early_stop_greedy_tokens_identical_to_step_by_step(pair, batch, criterion, proposal):
    rl, base = pair
    tau = 0.0 if criterion in ("always", "never") else median_threshold(rl, base, criterion, batch, proposal)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.5)
    model = DirectionalModelForCausalLM(rl, base, cfg)
    for i in range(3):  # batch 1: each round stops at the row's own first fire
        one = {key: value[i : i + 1] for key, value in batch.items()}
        ref = model.generate(**one, do_sample=False, max_new_tokens=13, eos_token_id=None)
        ref_ratio = model.last_replace_ratio
        for k in (6, "auto"):
            out = model.generate(**one, do_sample=False, max_new_tokens=13, eos_token_id=None, lookahead=k)
            assert torch.equal(out, ref), (criterion, i, k)
            torch.testing.assert_close(model.last_replace_ratio, ref_ratio)
            if k == 6:
                st = model.last_lookahead_stats
                assert st["drafted"] == st["accepted"] == 13  # batch 1: no drafted position is dropped
    ref = model.generate(**batch, do_sample=False, max_new_tokens=13, eos_token_id=None)
    assert torch.equal(model.generate(**batch, do_sample=False, max_new_tokens=13, eos_token_id=None, lookahead=6), ref)


def median_entropy(rl, base, prompt, which: str) -> float:
    """The median over the prefixes of `exact_tables` of H(pi_base) ("base") or H(pi_rl) ("rl")."""
    values = []
    for _prefix, l_rl, l_b in prefix_logits(rl, base, prompt):
        rl_n, base_n = normalize_pair(l_rl, l_b)
        values.append(float(position_metric("entropy" if which == "base" else "rl_entropy", rl_n, base_n)[0]))
    return float(torch.tensor(values).median())


def kept_draft_at_fire_samples(tables, n, generator):
    """The bug the early stop must avoid: at a fired position, keep the draft y ~ p instead of the redraw."""
    samples = []
    for _ in range(n):
        seq: tuple = ()
        while len(seq) < STEPS and EOS not in seq:
            p = tables[seq][0]
            # fired with probability M (random: tau; position-level: 0 / 1), and then the draft y ~ p is emitted
            # anyway (the bug: no redraw from r): every emitted token is a draw from p
            y = int(torch.multinomial(p, 1, generator=generator))
            seq = seq + (y,)
        samples.append(outcome(seq))
    return samples


@pytest.mark.parametrize(
    "criterion,proposal,k", [("random", "rl", 3), ("entropy", "base", 3), ("rl_entropy", "rl", "auto")]
)
def test_early_stop_sampling_distribution_equals_exact_enumeration(criterion, proposal, k):
    """Batch 1 (one row per call, so a round stops at the row's own first fire) against exact enumeration; the same
    test rejects a sampler that keeps the draft at the fired position."""
    rl = tiny_llama(0, vocab_size=SMALL_VOCAB, **PEAKY)
    base = tiny_llama(1, vocab_size=SMALL_VOCAB, **PEAKY)
    prompt = (1, 4, 3)
    tau = 0.3 if criterion == "random" else median_entropy(rl, base, prompt, proposal)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.5)
    tables = exact_tables(rl, base, prompt, cfg)
    probs = exact_distribution(tables)
    fired = [t[4] for t in tables.values()]
    assert 0.1 < sum(fired) / len(fired) < 0.9
    ids = torch.tensor([prompt])
    n = 1500
    torch.manual_seed(1)
    samples, drafted, positions = [], 0, 0
    for _ in range(n):
        out = _decode(rl, base, ids, None, cfg, lookahead=k, do_sample=True, max_new_tokens=STEPS,
                      eos_token_id=EOS, output_posterior=False)
        samples.append(outcome(out["sequences"][0, len(prompt):].tolist()))
        drafted += out["stats"]["drafted"]
        positions += out["stats"]["rounds"] * (3 if k == 3 else 0)
    assert chi_square_pvalue(samples, probs) > 1e-3
    if k == 3:
        assert drafted < 0.9 * positions  # the early stop was taken
    wrong = kept_draft_at_fire_samples(tables, n, torch.Generator().manual_seed(2))
    assert chi_square_pvalue(wrong, probs) < 1e-6


@pytest.mark.parametrize("criterion,proposal,stop_any", [("random", "rl", True), ("rl_entropy", "rl", True),
                                                         ("random", "rl", False)])
def test_early_stop_batch_4_distribution_equals_exact_enumeration(criterion, proposal, stop_any):
    """Batch 4: a round stops at the first fire of any row (`stop_any`, every row emits all n) or of every row."""
    rl = tiny_llama(0, vocab_size=SMALL_VOCAB, **PEAKY)
    base = tiny_llama(1, vocab_size=SMALL_VOCAB, **PEAKY)
    prompt = (1, 4, 3)
    tau = 0.3 if criterion == "random" else median_entropy(rl, base, prompt, proposal)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=tau, proposal=proposal, gamma=0.5)
    probs = exact_distribution(exact_tables(rl, base, prompt, cfg))
    ids = torch.tensor([prompt]).repeat(4, 1)
    torch.manual_seed(3)
    samples, drafted, accepted, any_rounds = [], 0, 0, 0
    for _ in range(400):
        out = _decode(rl, base, ids, None, cfg, lookahead=3, do_sample=True, max_new_tokens=STEPS, eos_token_id=EOS,
                      output_posterior=False, stop_any=stop_any)
        samples += [outcome(row) for row in out["sequences"][:, len(prompt):].tolist()]
        st = out["stats"]
        drafted, accepted = drafted + st["drafted"], accepted + st["accepted"]
        any_rounds += st["stop_any"]  # rows that ended (EOS) leave: a round of one row is a plain early stop
        assert st["stop_any"] <= st["rounds"] and (stop_any or st["stop_any"] == 0)
    assert chi_square_pvalue(samples, probs) > 1e-3
    assert (any_rounds > 400) == stop_any
    if stop_any and criterion == "random":
        assert accepted > 0.9 * drafted  # only EOS drops drafts


def _stop_step_by_step(fire, remaining, stop_any):
    """The drafting loop's own rule, position by position (what `stop_position` plans in one pass)."""
    rows, k = fire.shape
    drafting = [True] * rows
    for i in range(k):
        fired_now = stop_any and any(bool(fire[r, i]) and drafting[r] for r in range(rows))
        drafting = [drafting[r] and not bool(fire[r, i]) and int(remaining[r]) > i + 1 for r in range(rows)]
        if i + 1 == k or fired_now or not any(drafting):
            return i + 1


@pytest.mark.parametrize("stop_any", [False, True])
def test_stop_position_equals_the_step_by_step_rule(stop_any):
    from hf_extrapolate.lookahead import stop_position

    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        rows, k = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        fire = torch.rand(rows, k, generator=g) < float(torch.rand(1, generator=g)) * 0.6
        remaining = torch.randint(1, k + 3, (rows,), generator=g)
        assert stop_position(fire, remaining, stop_any) == _stop_step_by_step(fire, remaining, stop_any), (
            fire, remaining)
