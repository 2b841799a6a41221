"""The fast paths of the decoding step give what the straightforward computation gives: the top-k search for the
top-p nucleus equals transformers' sorting warper, and the fused LoRA pair's first-half update equals PEFT's
mixed-batch forward (and is the path actually taken for plain LoRA layers)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.generation.logits_process import TopPLogitsWarper

from hf_extrapolate import DirectionalModelForCausalLM, ExtrapolationConfig
from hf_extrapolate.distributions import top_p_filter, warp_logprobs
from tests.tiny import PAD, left_padded_batch, tiny_llama

NEG_INF = float("-inf")


@pytest.mark.parametrize("scale", [0.3, 2.0, 5.0, 12.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.7, 0.95])
def test_top_p_filter_keeps_the_same_tokens_as_transformers(scale, top_p):
    g = torch.Generator().manual_seed(int(scale * 10) + int(top_p * 100))
    scores = torch.randn(6, 32000, generator=g) * scale
    scores[:, :7] = NEG_INF  # masked upstream
    expected = TopPLogitsWarper(top_p=top_p)(None, scores.clone())
    ours = top_p_filter(scores, top_p)
    assert torch.equal(ours == NEG_INF, expected == NEG_INF)
    torch.testing.assert_close(ours[ours != NEG_INF], scores[ours != NEG_INF], rtol=0, atol=0)


def test_top_p_filter_on_peaked_and_flat_rows_together():
    scores = torch.zeros(3, 20000)
    scores[0, :10] = 30.0  # nucleus inside the first candidates
    scores[1] = torch.linspace(0.0, 1.0, 20000)  # nearly flat: falls back to the full sort
    scores[2, 5] = 50.0  # a single token holds all the mass
    expected = TopPLogitsWarper(top_p=0.8)(None, scores.clone())
    assert torch.equal(top_p_filter(scores, 0.8) == NEG_INF, expected == NEG_INF)


def _value_path_calls(monkeypatch):
    import hf_extrapolate.distributions as distributions

    calls = []
    original = distributions._top_p_by_value
    monkeypatch.setattr(distributions, "_top_p_by_value", lambda s, p: calls.append(s.shape) or original(s, p))
    return calls


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95])
def test_flat_rows_take_the_value_sort_and_equal_transformers_bit_for_bit(monkeypatch, top_p):
    calls = _value_path_calls(monkeypatch)
    g = torch.Generator().manual_seed(int(top_p * 100))
    scores = torch.randn(5, 32000, generator=g) * 0.3  # nearly uniform: the nucleus holds thousands of tokens
    scores[:, :7] = NEG_INF
    expected = TopPLogitsWarper(top_p=top_p)(None, scores.clone())
    ours = top_p_filter(scores, top_p)
    assert calls == [scores.shape]
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("flat", [True, False], ids=["value-sort", "top-k"])
def test_a_tie_across_the_nucleus_edge_keeps_what_transformers_keeps(monkeypatch, flat):
    calls = _value_path_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    if flat:  # bfloat16-rounded logits: many ties, one of them across the edge
        scores = (torch.randn(4, 32000, generator=g) * 0.3).to(torch.bfloat16).float()
    else:  # ten tokens tied at the top, each ~10% of the mass: top-p 0.75 ends inside the tie
        scores = torch.randn(4, 32000, generator=g)
        scores[:, 100:110] = 30.0
    top_p = 0.75
    expected = TopPLogitsWarper(top_p=top_p)(None, scores.clone())
    # the case is a real tie: keeping every token at least as likely as the last kept one keeps more
    smallest_kept = expected.masked_fill(expected == NEG_INF, float("inf")).amin(-1, keepdim=True)
    assert bool(((scores >= smallest_kept).sum(-1) > (expected != NEG_INF).sum(-1)).all())
    assert torch.equal(top_p_filter(scores, top_p), expected)
    assert len(calls) == int(flat)


def test_warp_does_not_renormalise_normalised_input_without_warpers():
    logp = torch.randn(2, 50).log_softmax(-1)
    assert warp_logprobs(logp, normalized=True) is logp
    torch.testing.assert_close(warp_logprobs(logp * 3.0), (logp * 3.0).log_softmax(-1))


def _lora(targets):
    torch.manual_seed(4)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(tiny_llama(4), cfg).eval()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["q_proj", "embed_tokens"]],
                         ids=["linear-only", "with-embedding-lora"])
def test_fused_pair_equals_fallback_pair(targets):
    peft_model = _lora(targets)
    inputs = left_padded_batch([5, 3])
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.05, gamma=0.3)
    results = {}
    for strategy in ("fallback", "fused"):
        model = DirectionalModelForCausalLM.from_peft(peft_model, cfg, lora_strategy=strategy)
        torch.manual_seed(1)
        out = model.generate(**inputs, do_sample=True, max_new_tokens=6, pad_token_id=PAD,
                             return_dict_in_generate=True, output_scores=True)
        results[strategy] = (out.sequences, torch.stack(out.scores, 1).softmax(-1))
    assert torch.equal(results["fused"][0], results["fallback"][0])
    torch.testing.assert_close(results["fused"][1], results["fallback"][1], atol=1e-5, rtol=0)
    assert not any(getattr(m, "_disable_adapters", False) for m in peft_model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in peft_model.modules())


def test_fused_pair_skips_peft_mixed_batch_for_plain_lora_linear(monkeypatch):
    from peft.tuners.lora.layer import LoraLayer

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT's mixed-batch forward was used for a plain LoRA Linear layer")

    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", refuse)
    model = DirectionalModelForCausalLM.from_peft(_lora(["q_proj", "v_proj"]), lora_strategy="fused")
    out = model.generate(**left_padded_batch([4, 2]), max_new_tokens=3, pad_token_id=PAD)
    assert out.shape == (2, 7)
