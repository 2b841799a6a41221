"""Diagnostics: teacher-forced token metrics, histograms, top tokens, replacement statistics and calibration."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_extrapolate import ExtrapolationConfig
from hf_extrapolate.analysis import (
    METRICS,
    ReplacementStatistics,
    calibrate_threshold,
    histogram_counts,
    metric_summary,
    plot_token_histograms,
    replacement_statistics,
    token_metrics,
    top_tokens,
)
from hf_extrapolate.directional import directional_step

from .tiny import EOS, left_padded_batch, tiny_gpt2, tiny_llama


def synthetic_pair(factory=tiny_llama, sharpen: float = 40.0, shift: float = 0.5, seed: int = 0):
    """A base model with peaked next-token distributions and an "RL" copy whose output layer moved a little."""
    base = factory(seed)
    head = base.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(sharpen)
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rl.get_output_embeddings().weight.add_(torch.randn(head.weight.shape, generator=g) * shift)
    return rl, base


def teacher_forced_batch(lengths=(5, 7, 3, 6), new=9, ends=(9, 4, 6, 1), seed=0):
    """Left-padded prompts, random continuations, and a response mask that ends row i after `ends[i]` tokens."""
    batch = left_padded_batch(list(lengths), seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    gen = torch.randint(3, 64, (len(lengths), new), generator=g)
    gen_mask = (torch.arange(new)[None, :] < torch.tensor(ends)[:, None]).long()
    sequences = torch.cat([batch["input_ids"], gen], dim=1)
    attention_mask = torch.cat([batch["attention_mask"], gen_mask], dim=1)
    return sequences, attention_mask, batch["input_ids"].shape[1]


def direct_logprobs(model, row_ids):
    """Next-token log-probs at every position of one unpadded row (no batching, no padding)."""
    with torch.no_grad():
        return torch.log_softmax(model(row_ids[None]).logits[0].float(), dim=-1)


def direct_metrics(rl, base, sequences, attention_mask, prompt_length):
    """The metrics written out from their definitions, one row and one position at a time."""
    rows, width = sequences.shape
    out = {name: torch.full((rows, width - prompt_length), float("nan")) for name in METRICS}
    for i in range(rows):
        keep = attention_mask[i].bool()
        ids = sequences[i][keep]
        offset = int((~keep[:prompt_length]).sum())  # left padding of this row
        lrl, lb = direct_logprobs(rl, ids), direct_logprobs(base, ids)
        for col in range(width - prompt_length):
            if not attention_mask[i, prompt_length + col]:
                continue
            pos = prompt_length + col - offset  # index of the token in the unpadded row
            a, b, y = lrl[pos - 1], lb[pos - 1], ids[pos]
            pa, pb = a.exp(), b.exp()
            out["rl_logprob"][i, col] = a[y]
            out["base_logprob"][i, col] = b[y]
            out["logp_diff"][i, col] = a[y] - b[y]
            out["rl_entropy"][i, col] = -(pa * a).sum()
            out["base_entropy"][i, col] = -(pb * b).sum()
            out["kl"][i, col] = (pa * (a - b)).sum()
            out["reverse_kl"][i, col] = (pb * (b - a)).sum()
            out["avg_kl"][i, col] = 0.5 * (out["kl"][i, col] + out["reverse_kl"][i, col])
    return out


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-absolute-positions"])
def test_token_metrics_match_direct_per_position_computation(factory):
    rl, base = synthetic_pair(factory)
    sequences, attention_mask, prompt_length = teacher_forced_batch()
    got = token_metrics(rl, base, sequences, attention_mask, prompt_length, batch_size=3, chunk_size=4)
    want = direct_metrics(rl, base, sequences, attention_mask, prompt_length)
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name].shape == (4, 9) and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], atol=2e-4, rtol=1e-4, equal_nan=True, msg=name)
    assert torch.isnan(got["kl"][3, 1:]).all() and not torch.isnan(got["kl"][3, 0])


def test_token_metrics_rejects_a_mask_of_the_wrong_shape():
    rl, base = synthetic_pair()
    sequences, attention_mask, prompt_length = teacher_forced_batch()
    with pytest.raises(ValueError, match="`attention_mask`"):
        token_metrics(rl, base, sequences, attention_mask[:, 1:], prompt_length)
    with pytest.raises(ValueError, match="`prompt_length`"):
        token_metrics(rl, base, sequences, attention_mask, sequences.shape[1])


def test_top_tokens_rank_mean_logp_diff_per_token():
    logp_diff = torch.tensor([[1.0, -2.0, 0.5, float("nan")], [3.0, -1.0, 0.5, 0.0]])
    tokens = torch.tensor([[5, 6, 7, 5], [5, 8, 7, 9]])

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    out = top_tokens(logp_diff, tokens, Tok(), k=2)
    assert [(e["token_id"], e["token"], e["count"]) for e in out["raised"]] == [(5, "<5>", 2), (7, "<7>", 2)]
    assert out["raised"][0]["mean_logp_diff"] == pytest.approx(2.0)
    assert [e["token_id"] for e in out["lowered"]] == [6, 8]
    # with min_count=2 only tokens 5 (mean 2.0) and 7 (0.5) remain, both raised: "lowered" is empty, not [7, 5]
    frequent = top_tokens(logp_diff, tokens, k=5, min_count=2)
    assert [e["token_id"] for e in frequent["raised"]] == [5, 7] and frequent["lowered"] == []


def test_top_tokens_refuses_bad_ids_and_k_and_handles_huge_ids():
    logp_diff = torch.tensor([[1.0, -2.0, 0.5]])
    with pytest.raises(ValueError, match=r"`k` \(=-3\) must be a positive integer"):
        top_tokens(logp_diff, torch.tensor([[5, 6, 7]]), k=-3)
    with pytest.raises(ValueError, match="negative id -1"):
        top_tokens(logp_diff, torch.tensor([[5, -1, 7]]))
    out = top_tokens(logp_diff, torch.tensor([[10**9, 6, 10**9]]))  # grouped by distinct ids: no 1e9-long bincount
    assert [(e["token_id"], e["count"], e["mean_logp_diff"]) for e in out["raised"]] == [(10**9, 2, 0.75)]
    assert [e["token_id"] for e in out["lowered"]] == [6]


def test_token_metrics_refuses_bad_chunk_sizes_and_out_of_vocabulary_ids():
    rl, base = tiny_llama(0), tiny_llama(1)
    sequences = torch.randint(3, 64, (2, 6))
    mask = torch.ones_like(sequences)
    for bad in (-1, 0, 1.5):
        with pytest.raises(ValueError, match=f"`chunk_size` \\(={bad}\\) must be a positive integer"):
            token_metrics(rl, base, sequences, mask, 2, chunk_size=bad)
    with pytest.raises(ValueError, match=r"`batch_size` \(=0\)"):
        token_metrics(rl, base, sequences, mask, 2, batch_size=0)
    for bad_id in (64, -5):
        wrong = sequences.clone()
        wrong[0, 1] = bad_id
        with pytest.raises(ValueError, match=f"token id {bad_id}, outside the models' vocabulary \\[0, 64\\)"):
            token_metrics(rl, base, wrong, mask, 2)
    # chunk_size=1 still gives the full result
    torch.testing.assert_close(token_metrics(rl, base, sequences, mask, 2, chunk_size=1)["kl"],
                               token_metrics(rl, base, sequences, mask, 2)["kl"], rtol=0, atol=1e-6)


def test_calibrate_threshold_without_attention_mask():
    rl, base = tiny_llama(0), tiny_llama(1)
    ids = torch.randint(3, 64, (2, 4))
    kw = dict(max_new_tokens=4, eos_token_id=2, pad_token_id=0, seed=0)
    cal = calibrate_threshold(rl, base, ids, None, 0.2, **kw)
    assert cal.threshold == calibrate_threshold(rl, base, ids, torch.ones_like(ids), 0.2, **kw).threshold
    padded = ids.clone()
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="`attention_mask` is None but `input_ids` holds the pad token 0"):
        calibrate_threshold(rl, base, padded, None, 0.2, **kw)


def test_histograms_share_edges_count_every_finite_value_and_draw_png(tmp_path):
    a = {"logp_diff": torch.tensor([[0.0, 1.0, float("nan")]]), "kl": torch.tensor([[0.1, 0.2, 0.3]])}
    b = {"logp_diff": torch.tensor([[-3.0, 2.0, 2.0]]), "kl": torch.tensor([[0.0, 0.0, 0.5]])}
    hist = histogram_counts({"base": a, "rl": b}, metrics=("logp_diff", "kl"), bins=10)
    assert hist["logp_diff"]["edges"][0] == -3.0 and hist["logp_diff"]["edges"][-1] == 2.0
    assert sum(hist["logp_diff"]["counts"]["base"]) == 2 and sum(hist["logp_diff"]["counts"]["rl"]) == 3
    json.dumps(hist)
    path = plot_token_histograms({"base": a, "rl": b}, tmp_path / "h.png", metrics=("logp_diff", "kl"), bins=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = metric_summary(a)
    assert summary["logp_diff"]["count"] == 2 and summary["logp_diff"]["mean"] == pytest.approx(0.5)


def per_position_masses(rl, base, sequences, attention_mask, prompt_length, config):
    """Mean over sequences of the mean over positions of `directional_step`'s replaced mass (the processor's M)."""
    ratios = []
    for i in range(sequences.shape[0]):
        keep = attention_mask[i].bool()
        ids = sequences[i][keep]
        offset = int((~keep[:prompt_length]).sum())
        with torch.no_grad():
            lrl, lb = rl(ids[None]).logits[0], base(ids[None]).logits[0]
        cols = [c for c in range(sequences.shape[1] - prompt_length) if attention_mask[i, prompt_length + c]]
        pos = torch.tensor([prompt_length + c - offset - 1 for c in cols])
        ratios.append(directional_step(lrl[pos], lb[pos], config)[1].mean())
    return float(torch.stack(ratios).mean())


@pytest.mark.parametrize("criterion", ["logp_diff", "entropy", "kl"])
def test_replacement_statistics_equal_the_processors_expected_mass(criterion):
    rl, base = synthetic_pair()
    sequences, attention_mask, prompt_length = teacher_forced_batch()
    config = ExtrapolationConfig(criterion=criterion, threshold=0.0, top_p=0.9, temperature=0.8)
    stats = replacement_statistics(rl, base, sequences, attention_mask, prompt_length, config, batch_size=2,
                                   chunk_size=3)[criterion]
    if criterion == "logp_diff":  # bin edges (where the histogram is exact) near -0.5, -0.2, -1e-3, 0, 0.5
        near = torch.tensor([-0.5, -0.2, -1e-3, 0.0, 0.5], dtype=stats.edges.dtype)
        values = stats.edges[torch.searchsorted(stats.edges, near)].tolist()
    else:
        values = [0.3, 0.8, 1.5]
    for tau in values:
        want = per_position_masses(rl, base, sequences, attention_mask, prompt_length, config.replace(threshold=tau))
        assert stats.ratio(tau) == pytest.approx(want, abs=1e-5), tau


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.8])
def test_logp_diff_calibration_resolves_mass_concentrated_near_zero(target):
    # where the two models nearly agree, |Delta log p| < 5e-3 everywhere: far below the 0.005-nat coarse bins
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g).log_softmax(-1)
    rl = (base + 2e-3 * torch.randn(400, 6, generator=g)).log_softmax(-1)
    config = ExtrapolationConfig(criterion="logp_diff")
    stats = ReplacementStatistics("logp_diff")
    stats.update(rl, base, torch.ones(400), config)
    tau = stats.threshold_for(target)
    exact = float(directional_step(rl, base, config.replace(threshold=tau))[1].mean())  # the processor's own mass
    assert abs(tau) < 5e-3 and exact == pytest.approx(target, abs=0.01)


def test_statistics_of_random_and_merge():
    stats = ReplacementStatistics("random")
    stats.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), ExtrapolationConfig())
    assert stats.threshold_for(0.25) == 0.25 and stats.ratio(0.4) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no threshold to calibrate"):
        ReplacementStatistics("always")
    with pytest.raises(ValueError, match="`target_ratio`"):
        stats.threshold_for(1.0)
    a, b = ReplacementStatistics("entropy"), ReplacementStatistics("entropy")
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [9.0, 0.0]]).log_softmax(-1)
    cfg = ExtrapolationConfig(criterion="entropy")
    a.update(logits[:2], logits[:2], torch.ones(2), cfg)
    b.update(logits[2:], logits[2:], torch.ones(1), cfg)
    merged = a.merge(b)
    assert merged.ratio(0.01) == pytest.approx(2 / 3) and merged.ratio(0.5) == pytest.approx(1 / 3)
    assert merged.ratio(merged.threshold_for(0.34)) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("criterion", "target", "refine_steps"), [("logp_diff", 0.1, 0), ("logp_diff", 0.3, 0), ("entropy", 0.2, 1)]
)
def test_calibration_hits_its_target_ratio_on_a_synthetic_pair(criterion, target, refine_steps):
    rl, base = synthetic_pair()
    batch = left_padded_batch([4, 6, 5, 3, 6, 4, 5, 6], seed=3)
    config = ExtrapolationConfig(criterion=criterion, top_p=0.95)
    cal = calibrate_threshold(rl, base, batch["input_ids"], batch["attention_mask"], target, config,
                              max_new_tokens=16, num_samples=4, eos_token_id=EOS, pad_token_id=0, seed=0,
                              refine_steps=refine_steps)
    assert cal.criterion == criterion and cal.ratio == pytest.approx(target, abs=0.01)
    # the same tau, applied by the processor's own math on the calibration text
    stats = cal.statistics
    assert stats.ratio(cal.threshold) == pytest.approx(cal.ratio)
    # and by the processor while generating fresh text
    from transformers import LogitsProcessorList

    from hf_extrapolate.processor import DirectionalLogitsProcessor

    torch.manual_seed(1)
    proc = DirectionalLogitsProcessor(base, config.replace(threshold=cal.threshold),
                                      attention_mask=batch["attention_mask"], eos_token_id=EOS)
    out = rl.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=16,
                      num_return_sequences=8, logits_processor=LogitsProcessorList([proc]), pad_token_id=0,
                      eos_token_id=EOS)
    assert float(proc.replace_ratio(out).mean()) == pytest.approx(target, abs=0.05)
