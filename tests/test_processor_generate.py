"""The processor inside `generate()`: at every call its output equals an independent recompute of both models on the
full prefix without any cache, for every decoding mode; plus invariances, statistics and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaModel, LogitsProcessor, LogitsProcessorList

from hf_extrapolate import DirectionalLogitsProcessor, ExtrapolationConfig, directional_step
from tests.test_directional_math import _np_q
from tests.tiny import EOS, PAD, left_padded_batch, tiny_gpt2, tiny_llama

NEUTRAL = dict(top_k=0, top_p=1.0, temperature=1.0)


class Tap(LogitsProcessor):
    """Records what flows through this point of the processor list."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


def full_prefix_logits(model, ids, prompt_mask):
    """Last-position logits of `model` on the whole prefix, no cache; mask/positions as generate computes them."""
    rows, length = ids.shape
    mask = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
    mask = torch.cat([mask, mask.new_ones(rows, length - mask.shape[1])], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def run_and_check(rl, base, inputs, cfg, gen_kwargs, *, num_beams=1, assistant=None, proc=None):
    do_sample = gen_kwargs.get("do_sample", False)
    proc = proc or DirectionalLogitsProcessor(
        base, cfg, attention_mask=inputs["attention_mask"], do_sample=do_sample, num_beams=num_beams
    )
    before, after = Tap(), Tap()
    extra = {"assistant_model": assistant} if assistant is not None else {}
    out = rl.generate(
        **inputs, **NEUTRAL, **gen_kwargs, **extra, num_beams=num_beams,
        logits_processor=LogitsProcessorList([before, proc, after]),
        pad_token_id=PAD,
    )
    assert len(before.calls) == len(after.calls) > 0
    greedy = not do_sample and num_beams == 1
    worst = 0.0
    for (ids, scores_in), (_, scores_out) in zip(before.calls, after.calls):
        base_logits = full_prefix_logits(base, ids, inputs["attention_mask"])
        expected, _ = directional_step(scores_in, base_logits, proc.config, greedy=greedy)
        if greedy:
            assert torch.equal(scores_out.argmax(-1), expected.argmax(-1))
        worst = max(worst, (scores_out.softmax(-1) - expected.softmax(-1)).abs().max().item())
    assert worst <= 1e-5, worst
    return out, proc, before.calls


CFG = ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.1)
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_left_padded_batch_matches_full_recompute(arch, do_sample):
    rl, base = MODELS[arch](0), MODELS[arch](1)
    inputs = left_padded_batch([4, 9, 1])
    torch.manual_seed(0)
    run_and_check(rl, base, inputs, CFG, dict(do_sample=do_sample, max_new_tokens=12))


def test_warpers_candidate_top_k_and_rl_proposal_match_full_recompute():
    rl, base = tiny_llama(0), tiny_llama(1)
    cfg = ExtrapolationConfig(
        proposal="rl", criterion="logp_diff", threshold=0.0, gamma=0.2, temperature=0.8, top_k=20, top_p=0.7,
        candidate_top_k=5,
    )
    torch.manual_seed(1)
    run_and_check(rl, base, left_padded_batch([6, 3]), cfg, dict(do_sample=True, max_new_tokens=10))


@pytest.mark.parametrize("criterion", ["avg_kl", "entropy", "random"])
def test_position_level_criteria_match_full_recompute(criterion):
    rl, base = tiny_llama(0), tiny_llama(1)
    cfg = ExtrapolationConfig(criterion=criterion, threshold=0.5 if criterion == "random" else 0.01, gamma=0.05)
    torch.manual_seed(2)
    run_and_check(rl, base, left_padded_batch([5, 2]), cfg, dict(do_sample=True, max_new_tokens=8))


def test_num_return_sequences_repeats_rows():
    rl, base = tiny_llama(0), tiny_llama(1)
    torch.manual_seed(3)
    out, proc, _ = run_and_check(
        rl, base, left_padded_batch([3, 7]), CFG, dict(do_sample=True, max_new_tokens=8, num_return_sequences=3)
    )
    assert out.shape[0] == 6 and proc.replace_ratio(out).shape == (6,)


@pytest.mark.parametrize("do_sample", [False, True])
def test_beam_search_reorders_the_base_cache(do_sample):
    rl, base = tiny_llama(0), tiny_llama(1)
    torch.manual_seed(4)
    _, proc, calls = run_and_check(
        rl, base, left_padded_batch([4, 6]), CFG,
        dict(do_sample=do_sample, max_new_tokens=8, num_return_sequences=2, early_stopping=True), num_beams=3,
    )
    assert proc.reference.stats["reorder"] == len(calls) - 1
    assert proc.reference.stats["prefill"] == 1


@pytest.mark.parametrize("do_sample", [False, True])
def test_assisted_decoding_rolls_the_base_cache_back(do_sample):
    rl, base, assistant = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    torch.manual_seed(5)
    out, proc, _ = run_and_check(
        rl, base, {k: v[:1] for k, v in left_padded_batch([5]).items()}, CFG,
        dict(do_sample=do_sample, max_new_tokens=16), assistant=assistant,
    )
    assert proc.reference.stats["rollback"] > 0
    ratio = proc.replace_ratio(out)
    assert ratio.shape == (1,) and 0.0 <= ratio.item() <= 1.0


def test_base_runs_one_forward_per_step_on_the_new_token_only():
    rl, base = tiny_llama(0), tiny_llama(1)
    seen = []
    hook = base.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    inputs = left_padded_batch([4, 6])
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"], do_sample=True)
    try:
        _generate(rl, inputs, 0, [proc], do_sample=True)
    finally:
        hook.remove()
    assert seen == [inputs["input_ids"].shape[1]] + [1] * 11  # prefill, then one new token per step


def test_second_generate_call_resets_automatically():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6])
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"], do_sample=True)
    torch.manual_seed(6)
    run_and_check(rl, base, inputs, CFG, dict(do_sample=True, max_new_tokens=6), proc=proc)
    out, _, _ = run_and_check(rl, base, inputs, CFG, dict(do_sample=True, max_new_tokens=9), proc=proc)
    assert proc.stats.prompt_length == inputs["input_ids"].shape[1]
    assert proc.replace_ratio(out).shape == (2,)


def test_base_on_other_dtype_and_padded_vocabulary():
    rl = tiny_llama(0, vocab_size=1008)  # padded embedding matrix, same tokenizer
    base = tiny_llama(1, vocab_size=1000).to(torch.float64)
    inputs = left_padded_batch([3, 5], vocab_size=1000)
    tap_in, tap_out = Tap(), Tap()
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"], do_sample=True)
    torch.manual_seed(7)
    rl.generate(**inputs, **NEUTRAL, do_sample=True, max_new_tokens=5, pad_token_id=PAD,
                logits_processor=LogitsProcessorList([tap_in, proc, tap_out]))
    for (ids, s_in), (_, s_out) in zip(tap_in.calls, tap_out.calls):
        assert torch.isneginf(s_out[:, 1000:]).all()
        expected, _ = directional_step(s_in[:, :1000], full_prefix_logits(base, ids, inputs["attention_mask"]), CFG)
        torch.testing.assert_close(s_out[:, :1000].softmax(-1), expected.softmax(-1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- invariances
def _generate(model, inputs, seed, processors=(), **kw):
    torch.manual_seed(seed)
    return model.generate(**inputs, **NEUTRAL, max_new_tokens=12, pad_token_id=PAD,
                          logits_processor=LogitsProcessorList(list(processors)), **kw)


@pytest.mark.parametrize("do_sample", [False, True])
def test_never_equals_plain_generate_of_the_proposal(do_sample):
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 7, 2])
    for proposal, model in (("base", base), ("rl", rl)):
        proc = DirectionalLogitsProcessor(base, attention_mask=inputs["attention_mask"], do_sample=do_sample,
                                          criterion="never", proposal=proposal, gamma=0.3)
        ours = _generate(rl, inputs, 11, [proc], do_sample=do_sample)
        plain = _generate(model, inputs, 11, do_sample=do_sample)
        assert torch.equal(ours, plain), proposal


@pytest.mark.parametrize("do_sample", [False, True])
def test_always_with_gamma_zero_equals_plain_rl_generate(do_sample):
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 7, 2])
    proc = DirectionalLogitsProcessor(base, attention_mask=inputs["attention_mask"], do_sample=do_sample,
                                      criterion="always", gamma=0.0)
    assert torch.equal(_generate(rl, inputs, 12, [proc], do_sample=do_sample), _generate(rl, inputs, 12, do_sample=do_sample))


def test_greedy_tokens_equal_an_explicit_uncached_loop():
    """Greedy Algorithm 1 written out by hand (float64 closed form, full recompute each step) gives the same tokens."""
    rl, base = tiny_gpt2(0), tiny_gpt2(1)
    inputs = left_padded_batch([5, 2, 8], seed=3)
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.05, gamma=0.5, top_p=0.9)
    proc = DirectionalLogitsProcessor(base, cfg, attention_mask=inputs["attention_mask"], do_sample=False)
    ours = _generate(rl, inputs, 0, [proc], do_sample=False)

    ids = inputs["input_ids"]
    for _ in range(12):
        lrl = full_prefix_logits(rl, ids, inputs["attention_mask"]).double().log_softmax(-1)
        lb = full_prefix_logits(base, ids, inputs["attention_mask"]).double().log_softmax(-1)
        nxt = []
        for i in range(ids.shape[0]):
            p, r = _pr(lrl[i], lb[i], cfg)
            y0 = int(np.argmax(p))
            finished = bool((ids[i, inputs["input_ids"].shape[1]:] == EOS).any())
            nxt.append(PAD if finished else int(np.argmax(r)) if lrl[i, y0] - lb[i, y0] < cfg.threshold else y0)
        ids = torch.cat([ids, torch.tensor(nxt)[:, None]], dim=1)
    assert torch.equal(ours, ids)


def _pr(lrl, lb, cfg):
    from tests.test_directional_math import _np_warp

    p = _np_warp(lb.numpy(), cfg.temperature, cfg.top_k, cfg.top_p)
    r = _np_warp(((1 + cfg.gamma) * lrl - cfg.gamma * lb).numpy(), cfg.temperature, cfg.top_k, cfg.top_p)
    return p, r


# ---------------------------------------------------------------------------- statistics
class ForceEOS(LogitsProcessor):
    """Upstream processor: row i must emit EOS at generated step `at[i]` (rows finish at different lengths)."""

    def __init__(self, prompt_length, at):
        self.prompt_length, self.at = prompt_length, at

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        out = scores.clone()
        out[:, EOS] = float("-inf")
        for i, a in enumerate(self.at):
            if step == a:
                out[i] = float("-inf")
                out[i, EOS] = 0.0
        return out


def test_replace_ratio_counts_each_row_up_to_its_eos():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6, 3])
    width = inputs["input_ids"].shape[1]
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.1)
    proc = DirectionalLogitsProcessor(base, cfg, attention_mask=inputs["attention_mask"], do_sample=True, eos_token_id=EOS)
    tap = Tap()
    torch.manual_seed(8)
    out = rl.generate(**inputs, **NEUTRAL, do_sample=True, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
                      logits_processor=LogitsProcessorList([ForceEOS(width, [2, 5, 100]), tap, proc]))
    # independent: M per call from the full recompute, averaged over positions up to and including each row's EOS
    masses = []
    for ids, s_in in tap.calls:
        lb = full_prefix_logits(base, ids, inputs["attention_mask"])
        lrl = s_in.log_softmax(-1)
        lb = lb.masked_fill(torch.isneginf(lrl), float("-inf")).log_softmax(-1)
        masses.append([_np_q(lrl[i].double().numpy(), lb[i].double().numpy(), cfg)[1] for i in range(ids.shape[0])])
    masses = np.array(masses).T  # (rows, steps)
    lengths = [3, 6, out.shape[1] - width]  # rows 0 and 1 stop at their forced EOS (inclusive)
    expected = [masses[i, : lengths[i]].mean() for i in range(3)]
    torch.testing.assert_close(proc.replace_ratio(out).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(proc.replace_ratio().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    post = proc.replaced_token_probability(out)
    assert post.shape == (3, out.shape[1] - width)
    assert torch.isnan(post[0, 3:]).all() and not torch.isnan(post[0, :3]).any()
    assert ((post[~torch.isnan(post)] >= 0) & (post[~torch.isnan(post)] <= 1)).all()


def test_replaced_token_posterior_is_exact_under_greedy():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6])
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"], do_sample=False)
    out = _generate(rl, inputs, 0, [proc], do_sample=False)
    post = proc.replaced_token_probability(out)
    assert set(post.flatten().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(proc.replace_ratio(out), post.mean(-1))


@pytest.mark.parametrize(
    "cfg",
    [
        ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.3),  # fast step, r in probability space
        ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.3, temperature=0.05),  # log-space rows
        ExtrapolationConfig(criterion="random", threshold=0.4, gamma=0.2, proposal="rl"),
        ExtrapolationConfig(criterion="entropy", threshold=1.0, gamma=0.2, top_p=0.8),  # the definition, log r
    ],
    ids=["fast", "fast-log-space", "random", "definition"],
)
def test_sampled_posterior_equals_an_independent_computation(cfg):
    """P(redraw | the token drawn) = M r(y) / q(y) at every sampled position, from the full recompute in float64."""
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6, 3])
    width = inputs["input_ids"].shape[1]
    proc = DirectionalLogitsProcessor(base, cfg, attention_mask=inputs["attention_mask"], do_sample=True, eos_token_id=EOS)
    tap = Tap()
    torch.manual_seed(3)
    out = rl.generate(**inputs, **NEUTRAL, do_sample=True, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                      logits_processor=LogitsProcessorList([ForceEOS(width, [3, 100, 100]), tap, proc]))
    expected = np.full((3, out.shape[1] - width), np.nan)
    for ids, s_in in tap.calls:
        step = ids.shape[1] - width
        lb = full_prefix_logits(base, ids, inputs["attention_mask"])
        lrl = s_in.log_softmax(-1)
        lb = lb.masked_fill(torch.isneginf(lrl), float("-inf")).log_softmax(-1)
        for i in range(3):
            q, m, _, r = _np_q(lrl[i].double().numpy(), lb[i].double().numpy(), cfg)
            y = int(out[i, ids.shape[1]])
            expected[i, step] = m * r[y] / q[y] if q[y] > 0 else 0.0
    post = proc.replaced_token_probability(out)
    valid = ~torch.isnan(post)
    assert valid.sum() > 12 and not valid[0, 4:].any()  # row 0 ends at its EOS (step 3), NaN after it
    got = post[valid].double()
    want = torch.from_numpy(expected)[valid]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert 0.0 < float(want.mean()) < 1.0 or cfg.criterion == "entropy"  # the posteriors vary: not trivially 0 / 1


# ---------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    rl, base = tiny_llama(0), tiny_llama(1)
    inputs = left_padded_batch([4, 6, 3])
    with pytest.raises(TypeError, match="base_model"):
        DirectionalLogitsProcessor(LlamaModel(base.config))
    with pytest.raises(ValueError, match="criterion"):
        DirectionalLogitsProcessor(base, criterion="bogus")
    with pytest.raises(TypeError, match="unknown field"):
        DirectionalLogitsProcessor(base, gama=0.1)
    with pytest.raises(ValueError, match="attention_mask"):
        DirectionalLogitsProcessor(base, attention_mask=torch.ones(4))
    proc = DirectionalLogitsProcessor(base, attention_mask=inputs["attention_mask"][:2], do_sample=True)
    with pytest.raises(ValueError, match="batch size 2"):
        _generate(rl, inputs, 0, [proc], do_sample=True)
    other = tiny_llama(1, vocab_size=100)
    proc = DirectionalLogitsProcessor(other, attention_mask=inputs["attention_mask"], do_sample=True)
    with pytest.raises(ValueError, match="different vocabularies"):
        _generate(rl, inputs, 0, [proc], do_sample=True)


def test_scores_are_not_modified_in_place():
    base = tiny_llama(1)
    inputs = left_padded_batch([3, 5])
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"])
    scores = torch.randn(2, 64)
    before = scores.clone()
    proc(inputs["input_ids"], scores)
    assert torch.equal(scores, before)
