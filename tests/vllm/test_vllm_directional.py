"""DirectionalLLM against a transformers full recompute: greedy tokens, log q of the returned log-probs, replaced
mass, per-request overrides in one batch, a long shared prompt (prefix caching + chunked prefill)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the [vllm] environment: see .ci/run)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from hf_extrapolate import ExtrapolationConfig  # noqa: E402
from tests.vllm.reference import Recompute  # noqa: E402

DEFAULT = ExtrapolationConfig(threshold=-0.5, gamma=0.1)  # the engine fixture's default
PROMPTS = [[1, 38, 34, 12, 17, 10], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 40]]


@pytest.fixture(scope="module")
def recompute(pair):
    return Recompute(*pair)


def _prompts(ids):
    return [{"prompt_token_ids": p} for p in ids]


def _check_sampled(recompute, prompt, completion, config, k):
    """Returned top-k log-probs and the drawn token's log-prob are log q of the recompute; replaced mass is M."""
    tokens = list(completion.token_ids)
    log_q, mass = recompute.steps(prompt, tokens, config, greedy=False)
    assert len(completion.logprobs) == len(tokens)
    for t, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        assert token in entry
        ids = list(entry)
        got = torch.tensor([entry[i].logprob for i in ids])
        torch.testing.assert_close(got, log_q[t, ids], atol=1e-4, rtol=0)
        top = log_q[t].topk(k).indices.tolist()
        assert set(top) <= set(ids)
    torch.testing.assert_close(torch.tensor(completion.replaced_mass), mass, atol=1e-5, rtol=0)
    assert completion.replace_ratio == pytest.approx(float(mass.mean()), abs=1e-6)
    return mass


def _check_greedy(recompute, prompts, outs, config, steps):
    """Greedy tokens are the recompute's two-stage greedy choice, and the replaced mass is exactly 0 or 1 per token."""
    fired = []
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        expected = recompute.greedy(prompt, steps, config, eos=-1)
        assert list(completion.token_ids) == expected
        _, mass = recompute.steps(prompt, expected, config, greedy=True)
        assert completion.replaced_mass == mass.tolist()
        fired += completion.replaced_mass
    assert 0 < sum(fired) < len(fired)  # the criterion fired on some tokens and not on others: the test can fail


def test_greedy_is_the_two_stage_greedy_choice(engine, recompute):
    outs = engine.generate(_prompts(PROMPTS), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    _check_greedy(recompute, PROMPTS, outs, DEFAULT, 12)


def test_sampled_logprobs_are_log_q_with_inner_warpers(engine, recompute):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=10, n=2, seed=3, logprobs=5,
                            ignore_eos=True)
    outs = engine.generate(_prompts(PROMPTS), params)
    config = DEFAULT.replace(temperature=0.8, top_p=0.9, top_k=40)
    for prompt, out in zip(PROMPTS, outs):
        assert [c.index for c in out.outputs] == [0, 1]
        for completion in out.outputs:
            mass = _check_sampled(recompute, prompt, completion, config, k=5)
            assert 0 < float(mass.mean()) < 1
    # negative control: the RL model's own distribution is not what was returned
    prompt, completion = PROMPTS[0], outs[0].outputs[0]
    rl_only, _ = recompute.steps(prompt, list(completion.token_ids), config.replace(criterion="always", gamma=0.0),
                                 greedy=False)
    token = completion.token_ids[0]
    assert abs(completion.logprobs[0][token].logprob - float(rl_only[0, token])) > 1e-3


def test_seeded_requests_repeat(engine):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    first = engine.generate(_prompts(PROMPTS[:1]), params)[0].outputs[0].token_ids
    again = engine.generate(_prompts(PROMPTS[:1]), params)[0].outputs[0].token_ids
    assert list(first) == list(again)


def test_per_request_overrides_in_one_batch(engine, recompute):
    overrides = [{"gamma": 0.5}, {"criterion": "entropy", "threshold": 3.0, "proposal": "rl"}, {},
                 {"criterion": "random", "threshold": 0.3, "gamma": -0.2}]
    params = [SamplingParams(temperature=1.0, max_tokens=8, seed=i, logprobs=3, ignore_eos=True,
                             extra_args={"extrapolation_config": o}) for i, o in enumerate(overrides)]
    prompts = [PROMPTS[0]] * len(overrides)
    outs = engine.generate(_prompts(prompts), params)
    for prompt, out, override in zip(prompts, outs, overrides):
        _check_sampled(recompute, prompt, out.outputs[0], DEFAULT.replace(**override), k=3)
    assert params[0].extra_args == {"extrapolation_config": {"gamma": 0.5}}  # the user's objects are untouched
    assert params[0].temperature == 1.0 and params[0].n == 1


def test_long_shared_prompt_prefix_caching_and_chunked_prefill(engine, recompute):
    # 300 prompt tokens in prefill chunks of 128; the second round finds the shared prefix in the cache
    shared = [1] + [3 + (7 * i) % 80 for i in range(300)]
    prompts = [shared + [41], shared + [42, 43]]
    params = SamplingParams(temperature=1.0, top_p=0.8, max_tokens=6, logprobs=2, ignore_eos=True)
    config = DEFAULT.replace(top_p=0.8)
    for _round in range(2):
        outs = engine.generate(_prompts(prompts), params)
        for prompt, out in zip(prompts, outs):
            _check_sampled(recompute, prompt, out.outputs[0], config, k=2)
        assert _round == 0 or min(out.num_cached_tokens for out in outs) > 0


def test_chat_renders_the_template(engine):
    out = engine.chat([{"role": "user", "content": "Compute 2+3."}], SamplingParams(temperature=0, max_tokens=4))[0]
    tok = engine.get_tokenizer()
    expected = tok.apply_chat_template([{"role": "user", "content": "Compute 2+3."}], tokenize=True,
                                       add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(out.prompt_token_ids) == list(expected) and expected[0] == tok.bos_token_id
    assert not math.isnan(out.outputs[0].replace_ratio)


def test_requests_that_would_bypass_the_step_are_refused(engine):
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.generate(_prompts(PROMPTS[:1]), SamplingParams(max_tokens=2, presence_penalty=0.5))
    with pytest.raises(ValueError, match="gamma"):
        engine.generate(_prompts(PROMPTS[:1]), SamplingParams(max_tokens=2, extra_args={
            "extrapolation_config": {"gamma": float("nan")}}))
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match="DirectionalLLM"):  # a plain request to the engine
        engine.llm.generate(_prompts(PROMPTS[:1]), SamplingParams(max_tokens=2))
