"""Plausible mistakes end in the right result or in an error that names the argument and the fix (issue 11).

Each test reproduces a mistake that returned a wrong number without any warning before; the expected value comes
from an independent computation (a freshly configured processor, the explicit two-stage greedy choice, plain
`generate` on the same model).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_extrapolate import DirectionalLogitsProcessor, DirectionalModelForCausalLM, ExtrapolationConfig
from hf_extrapolate.cache_compat import output_cache

from .tiny import EOS, PAD, left_padded_batch, tiny_llama

VOCAB = 48
CFG = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.5)


def _peaked(seed):
    model = tiny_llama(seed, vocab_size=VOCAB)
    model.lm_head.weight.data *= 6  # peaked distributions: the criterion fires on some tokens, not all
    return model


@pytest.fixture(scope="module")
def pair():
    return _peaked(0), _peaked(1)


def _batch(lengths=(5, 2, 3), seed=0):
    return left_padded_batch(list(lengths), seed=seed, vocab_size=VOCAB)


NEUTRAL = dict(top_k=0, top_p=1.0, temperature=1.0)


def _sampled_scores(rl, proc, inputs, steps=6, seed=0):
    torch.manual_seed(seed)
    out = rl.generate(**inputs, do_sample=True, **NEUTRAL, logits_processor=LogitsProcessorList([proc]),
                      max_new_tokens=steps, min_new_tokens=steps, pad_token_id=PAD, return_dict_in_generate=True,
                      output_scores=True)
    return out.sequences, torch.stack(out.scores, 1)


# ---------------------------------------------------------------------------------------------- the attention mask
def test_processor_reused_on_new_batch_without_mask_follows_generate(pair):
    rl, base = pair
    a, b = _batch((5, 2, 3), seed=0), _batch((2, 5, 3), seed=1)
    reused = DirectionalLogitsProcessor(base, CFG)  # no mask: it reads generate's
    _sampled_scores(rl, reused, a)
    seq, scores = _sampled_scores(rl, reused, b, seed=3)
    fresh = DirectionalLogitsProcessor(base, CFG, attention_mask=b["attention_mask"])
    seq_ref, scores_ref = _sampled_scores(rl, fresh, b, seed=3)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=0)


def test_stale_mask_on_reuse_is_refused(pair):
    rl, base = pair
    a, b = _batch((5, 2, 3), seed=0), _batch((2, 5, 3), seed=1)
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=a["attention_mask"])
    _sampled_scores(rl, proc, a)
    with pytest.raises(ValueError, match="differs from the one generate uses"):
        _sampled_scores(rl, proc, b)
    proc.reset(attention_mask=b["attention_mask"])  # the fix the message names
    _sampled_scores(rl, proc, b)


def test_mask_narrower_than_prompt_is_refused(pair):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"][:, 2:])
    with pytest.raises(ValueError, match="covers 3 tokens but the prompt generate starts from has 5"):
        _sampled_scores(rl, proc, inputs)


def test_left_padded_batch_without_mask_gets_generates_mask(pair):
    rl, base = pair
    inputs = _batch()
    no_mask = DirectionalLogitsProcessor(base, CFG)
    seq, scores = _sampled_scores(rl, no_mask, {"input_ids": inputs["input_ids"]})  # transformers infers the mask
    with_mask = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"])
    seq_ref, scores_ref = _sampled_scores(rl, with_mask, inputs)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=0)


def test_outside_generate_a_stale_mask_is_caught_from_the_padding(pair):
    _, base = pair
    a, b = _batch((5, 2, 3), seed=0), _batch((2, 5, 3), seed=1)
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=a["attention_mask"], do_sample=True)
    scores = torch.randn(3, VOCAB)
    with pytest.raises(ValueError, match="does not match the padding"):
        proc(b["input_ids"], scores)  # a loop of one's own: no generate call to read the mask from


# ---------------------------------------------------------------------------------------------- decoding mode
def _two_stage_greedy(rl, base, inputs, cfg, steps):
    """Independent greedy reference: full recompute of both models, y0 = argmax p, argmax r where it fires."""
    from hf_extrapolate.criteria import fires
    from hf_extrapolate.directional import normalize_pair, proposal_and_replacement

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            l_rl = rl(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            l_b = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        lrl, lb = normalize_pair(l_rl, l_b)
        log_p, log_r = proposal_and_replacement(lrl, lb, cfg)
        y0 = log_p.argmax(-1, keepdim=True)
        fire = fires(cfg.criterion, cfg.threshold, lrl.gather(-1, y0), lb.gather(-1, y0)).squeeze(-1)
        y = torch.where(fire, log_r.argmax(-1), y0.squeeze(-1))
        ids = torch.cat([ids, y[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def test_default_processor_follows_greedy_generate(pair):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG)  # do_sample not given
    out = rl.generate(**inputs, do_sample=False, logits_processor=LogitsProcessorList([proc]), max_new_tokens=6,
                      min_new_tokens=6, pad_token_id=PAD)
    assert torch.equal(out, _two_stage_greedy(rl, base, inputs, CFG, 6))



class _UserWrapper(LogitsProcessor):
    """A user's own processor that calls the directional one (e.g. to log or post-process its scores)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_ids, scores):
        return self.inner(input_ids, scores)


def test_wrapped_processor_still_follows_greedy_generate(pair):
    """Wrapped in another processor it is not itself in generate's list: it still reads the decoding loop's mode
    (the old code fell back to sampling and returned log q, whose argmax is not the two-stage greedy choice)."""
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG)
    out = rl.generate(**inputs, do_sample=False, logits_processor=LogitsProcessorList([_UserWrapper(proc)]),
                      max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD)
    assert proc.greedy
    assert torch.equal(out, _two_stage_greedy(rl, base, inputs, CFG, 6))


@pytest.mark.parametrize("kw", [dict(do_sample=True), dict(num_beams=2)], ids=["do_sample", "num_beams"])
def test_processor_mode_contradicting_greedy_generate_is_refused(pair, kw):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG, **kw)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"`{name}`={kw[name]}.*inside a generate call"):
        rl.generate(**inputs, do_sample=False, logits_processor=LogitsProcessorList([proc]), max_new_tokens=3,
                    pad_token_id=PAD)


@pytest.mark.parametrize(
    "kw, named",
    [(dict(top_k=10, temperature=0.7, top_p=1.0), "TemperatureLogitsWarper"),
     (dict(), r"TopKLogitsWarper\(top_k=50\)"),  # transformers' own default
     (dict(top_k=0, top_p=0.9), "TopPLogitsWarper"),
     (dict(top_k=0, min_p=0.1), "MinPLogitsWarper")],
    ids=["temperature", "default-top-k", "top-p", "min-p"],
)
def test_outer_warpers_are_refused_by_name(pair, kw, named):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG, attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=named + ".*after DirectionalLogitsProcessor"):
        rl.generate(**inputs, do_sample=True, logits_processor=LogitsProcessorList([proc]), max_new_tokens=3,
                    pad_token_id=PAD, **kw)


def test_reshaping_processor_before_is_refused(pair):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG)
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor.*repetition_penalty=1.0"):
        rl.generate(**inputs, do_sample=True, **NEUTRAL, repetition_penalty=1.3,
                    logits_processor=LogitsProcessorList([proc]), max_new_tokens=3, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("field, value", [("gamma", 1e38), ("gamma", 1e39), ("gamma", -2e3), ("temperature", 1e-41),
                                          ("temperature", 1e39)])
def test_config_bounds_keep_the_math_finite(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        ExtrapolationConfig(**{field: value})


@pytest.mark.parametrize("criterion", ["always", "logp_diff", "avg_kl"])
@pytest.mark.parametrize("extreme", [dict(gamma=1e3), dict(gamma=-1e3), dict(temperature=1e-4),
                                     dict(temperature=1e4)])
def test_extreme_settings_within_bounds_give_finite_scores(criterion, extreme):
    from hf_extrapolate import directional_logprobs, directional_step

    g = torch.Generator().manual_seed(0)
    rl, base = torch.randn(4, 50, generator=g) * 30, torch.randn(4, 50, generator=g) * 30
    rl[0, :45] = float("-inf")  # an upstream mask
    cfg = ExtrapolationConfig(criterion=criterion, top_p=0.7, **extreme)
    for out in (directional_logprobs(rl, base, cfg), directional_step(rl, base, cfg, greedy=True)[0]):
        assert not out.isnan().any() and torch.isfinite(out.amax(-1)).all()


def _hook_logits(model, fn):
    return model.lm_head.register_forward_hook(lambda m, args, out: fn(out.clone()))


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_nan_in_base_logits_names_the_base_model(pair, do_sample):
    rl, base = pair
    inputs = _batch()

    def poison(out):
        out[1, -1, 7] = float("nan")
        return out

    handle = _hook_logits(base, poison)
    try:
        proc = DirectionalLogitsProcessor(base, CFG.replace(proposal="rl"))
        with pytest.raises(FloatingPointError, match="base model's logits are not finite at generation step 0"):
            rl.generate(**inputs, do_sample=do_sample, **(NEUTRAL if do_sample else {}),
                        logits_processor=LogitsProcessorList([proc]), max_new_tokens=3, pad_token_id=PAD)
    finally:
        handle.remove()


def test_overflowing_base_names_the_base_model(pair):
    rl, base = pair
    inputs = _batch()
    handle = _hook_logits(base, lambda out: out.masked_fill(torch.arange(VOCAB) == 9, float("inf")))
    try:
        proc = DirectionalLogitsProcessor(base, CFG)
        with pytest.raises(FloatingPointError, match="base model's logits .*fp16 overflows"):
            rl.generate(**inputs, do_sample=True, **NEUTRAL, logits_processor=LogitsProcessorList([proc]),
                        max_new_tokens=3, pad_token_id=PAD)
    finally:
        handle.remove()


class _AllowOnly(LogitsProcessor):
    def __init__(self, allowed, fill=float("-inf")):
        self.allowed, self.fill = allowed, fill

    def __call__(self, input_ids, scores):
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[self.allowed] = True
        return scores.masked_fill(~keep, self.fill)


def test_base_excluding_every_allowed_token_is_refused(pair):
    rl, base = pair
    inputs = _batch()
    handle = _hook_logits(base, lambda out: out.index_fill(-1, torch.tensor([3, 4]), float("-inf")))
    try:
        proc = DirectionalLogitsProcessor(base, CFG)
        with pytest.raises(FloatingPointError, match="assigns probability 0 to every token the RL model allows"):
            rl.generate(**inputs, do_sample=True, **NEUTRAL, max_new_tokens=3, pad_token_id=PAD,
                        logits_processor=LogitsProcessorList([_AllowOnly([3, 4]), proc]))
    finally:
        handle.remove()


def test_nan_in_rl_scores_names_the_rl_model(pair):
    rl, base = pair
    inputs = _batch()
    proc = DirectionalLogitsProcessor(base, CFG)
    with pytest.raises(FloatingPointError, match="RL model's scores are not finite"):
        rl.generate(**inputs, do_sample=True, **NEUTRAL, max_new_tokens=3, pad_token_id=PAD,
                    logits_processor=LogitsProcessorList([_AllowOnly([3, 4], fill=float("nan")), proc]))


# ---------------------------------------------------------------------------------------------- the wrapper
def _eos_prone(seed):
    model = _peaked(seed)
    model.lm_head.register_forward_hook(lambda m, args, out: out + 4.0 * (torch.arange(VOCAB) == EOS))  # EOS likely
    return model


def test_wrapper_eos_token_id_none_means_what_it_means_to_generate():
    rl, base = _eos_prone(0), _eos_prone(1)
    inputs = _batch()
    pair = DirectionalModelForCausalLM.from_models(rl, base, ExtrapolationConfig(proposal="rl", criterion="never"))
    for eos in (None, EOS):
        kw = dict(do_sample=True, max_new_tokens=12, pad_token_id=PAD, eos_token_id=eos)
        torch.manual_seed(2)
        plain = rl.generate(**inputs, **NEUTRAL, **kw)
        torch.manual_seed(2)
        ours = pair.generate(**inputs, **kw)
        assert torch.equal(ours, plain)
        if eos is None:  # it did not stop at the checkpoint's EOS
            assert ours.shape[1] == 5 + 12 and bool((ours[:, 5:-1] == EOS).any())


def _peft_pair():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_peaked(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_fused_pair_follows_the_users_disable_adapter():
    peft_model = _peft_pair()
    inputs = _batch()
    pair = DirectionalModelForCausalLM.from_peft(peft_model, CFG)
    with peft_model.disable_adapter():
        torch.manual_seed(0)
        out = pair.generate(**inputs, do_sample=True, max_new_tokens=8, pad_token_id=PAD,
                            return_dict_in_generate=True)
        torch.manual_seed(0)
        plain = peft_model.generate(**inputs, do_sample=True, **NEUTRAL, max_new_tokens=8, pad_token_id=PAD)
    assert pair.last_lora_strategy == "fallback" and out.lora_strategy == "fallback"
    torch.testing.assert_close(out.replace_ratio, torch.zeros(3))  # RL == base: the direction is 0, nothing fires
    assert torch.equal(out.sequences, plain)
    torch.manual_seed(0)
    pair.generate(**inputs, do_sample=True, max_new_tokens=8, pad_token_id=PAD)
    assert pair.last_lora_strategy == "fused" and float(pair.last_replace_ratio.mean()) > 0


def test_fused_pair_returns_batch_rows_only():
    peft_model = _peft_pair()
    inputs = _batch()
    outs = {}
    for strategy in ("fused", "fallback"):
        pair = DirectionalModelForCausalLM.from_peft(peft_model, CFG, lora_strategy=strategy)
        torch.manual_seed(0)
        outs[strategy] = pair.generate(**inputs, do_sample=True, max_new_tokens=4, pad_token_id=PAD,
                                       return_dict_in_generate=True, output_hidden_states=True)
    fused, fallback = outs["fused"], outs["fallback"]
    assert output_cache(fused).layers[0].keys.shape[0] == 3 == output_cache(fallback).layers[0].keys.shape[0]
    for step_f, step_b in zip(fused.hidden_states, fallback.hidden_states):
        for h_f, h_b in zip(step_f, step_b):
            assert h_f.shape == h_b.shape
            torch.testing.assert_close(h_f, h_b, atol=1e-5, rtol=1e-5)  # the RL rows, not the base rows


def test_base_in_train_mode_runs_in_eval_mode_and_is_restored(pair):
    rl, base = pair
    inputs = _batch()
    dropout_base = copy.deepcopy(base)
    dropout_base.config.attention_dropout = 0.5
    for layer in dropout_base.model.layers:
        layer.self_attn.attention_dropout = 0.5
    results = []
    for model in (dropout_base.train(), dropout_base.eval()):
        proc = DirectionalLogitsProcessor(model, CFG)
        results.append(_sampled_scores(rl, proc, inputs, seed=4))
    dropout_base.train()
    proc = DirectionalLogitsProcessor(dropout_base, CFG)
    _sampled_scores(rl, proc, inputs)
    assert dropout_base.training  # restored
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.2), dict(min_p=0.1)])
def test_wrapper_refuses_settings_that_reshape_one_component(pair, kw):
    rl, base = pair
    model = DirectionalModelForCausalLM.from_models(rl, base, CFG)
    with pytest.raises(ValueError, match=f"`{next(iter(kw))}`.*not supported"):
        model.generate(**_batch(), do_sample=True, max_new_tokens=2, pad_token_id=PAD, **kw)


def test_wrapper_causes_no_warnings_that_plain_generate_does_not(pair, caplog):
    import transformers

    rl, base = pair
    model = DirectionalModelForCausalLM.from_models(rl, base, ExtrapolationConfig(top_p=0.7))
    one = {k: v[1:2, 3:] for k, v in _batch().items()}  # assisted decoding takes one row
    assistant = _peaked(2)
    calls = [(_batch(), dict(do_sample=False)), (_batch(), dict(do_sample=True)),
             (one, dict(assistant_model=assistant))]

    def messages(fn, inputs, kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fn(**inputs, max_new_tokens=2, pad_token_id=PAD, **kw)
        return {r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING}

    transformers.logging.enable_propagation()
    try:
        for inputs, kw in calls:
            plain = messages(rl.generate, inputs, {**kw, **(NEUTRAL if kw.get("do_sample") else {})})
            ours = messages(model.generate, inputs, kw)
            assert ours <= plain, ours - plain
    finally:
        transformers.logging.disable_propagation()


@pytest.mark.parametrize("method", ["replace_ratio", "replaced_token_probability"])
def test_statistics_before_any_generate_say_what_to_do(pair, method):
    _, base = pair
    proc = DirectionalLogitsProcessor(base, CFG)
    with pytest.raises(RuntimeError, match=r"call `generate\(..., logits_processor=\[processor\]\)` first"):
        getattr(proc, method)()
