"""`fast_step` (the processor's hot path) against the definition, `directional_step_with_replacement`."""

import itertools

import pytest
import torch

from hf_extrapolate import ExtrapolationConfig
from hf_extrapolate.directional import directional_step_with_replacement
from hf_extrapolate.fast_step import covers, fast_step

TOL = dict(rtol=1e-5, atol=1e-5)


def pair(rows=5, vocab=97, scale=2.0, mask=True, seed=0, close=False):
    g = torch.Generator().manual_seed(seed)
    rl = torch.randn(rows, vocab, generator=g) * scale
    base = rl + 0.3 * torch.randn(rows, vocab, generator=g) if close else torch.randn(rows, vocab, generator=g) * scale
    if mask:  # tokens masked upstream (min_new_tokens, bad words): a column everywhere, and most of one row
        rl[:, 3] = float("-inf")
        rl[1, 10:80] = float("-inf")
    return rl, base


CONFIGS = [
    dict(criterion=c, proposal=p, threshold=t, gamma=g, temperature=T)
    for c, p, t, g, T in itertools.product(
        ("logp_diff", "logp_other_minus_proposal", "logp_proposal_minus_other"), ("rl", "base"), (-0.3, 0.2),
        (0.0, 0.1, -0.5, 2.0), (1.0, 0.7),
    )
] + [dict(criterion="random", proposal=p, threshold=t, gamma=0.1, temperature=T)
     for p, t, T in itertools.product(("rl", "base"), (0.0, 0.05, 1.0), (1.0, 1.3))]


def assert_same(fast, rl, base, cfg, greedy, generator_seed=None):
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    scores, mass, log_r = directional_step_with_replacement(rl, base, cfg, greedy=greedy, generator=gen)
    torch.testing.assert_close(fast.scores, scores, **TOL)
    torch.testing.assert_close(fast.mass, mass, **TOL)
    if not greedy and fast.redraw_is_log:
        torch.testing.assert_close(fast.redraw, log_r, **TOL)
    elif not greedy:  # in probability space: below float32's normal range r may be rounded to 0
        normal = log_r > -86.0
        torch.testing.assert_close(fast.redraw.log()[normal], log_r[normal], **TOL)
        assert bool((fast.redraw[~normal] < 1e-37).all())
    assert fast.finite is True or bool(torch.isfinite(fast.finite).all())


@pytest.mark.parametrize("branch_free", [False, True])
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_fast_step_equals_definition(kw, greedy, branch_free):
    cfg = ExtrapolationConfig(**kw)
    assert covers(cfg)
    for seed, mask, close in ((0, True, False), (1, False, True), (2, True, True)):
        rl, base = pair(seed=seed, mask=mask, close=close)
        rl_before, base_before = rl.clone(), base.clone()
        step = fast_step(rl, base, cfg, greedy=greedy, branch_free=branch_free,
                         generator=torch.Generator().manual_seed(7))
        assert_same(step, rl, base, cfg, greedy, generator_seed=7)
        torch.testing.assert_close(rl, rl_before, rtol=0, atol=0)  # inputs are never modified
        torch.testing.assert_close(base, base_before, rtol=0, atol=0)


@pytest.mark.parametrize("greedy", [False, True])
def test_deep_tail_is_exact(greedy):
    """Logits spread over hundreds of nats: q underflows float32 in probability space, and the step falls back to the
    log-space form (a lower temperature makes it worse)."""
    for T in (1.0, 0.3):
        cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.5, temperature=T)
        rl, base = pair(scale=60.0, seed=3)
        scores, _, _ = directional_step_with_replacement(rl, base, cfg, greedy=greedy)
        assert float(scores[torch.isfinite(scores)].min()) < -200  # the tail really is beyond float32's range
        assert_same(fast_step(rl, base, cfg, greedy=greedy), rl, base, cfg, greedy)


def test_comparison_can_fail():
    """Negative controls: the same check rejects the step of a nearby threshold, gamma or the other proposal."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    rl, base = pair(seed=4)
    other = "rl" if cfg.proposal == "base" else "base"
    for wrong in (dict(threshold=-0.25), dict(threshold=-10.0), dict(gamma=0.12), dict(proposal=other)):
        for greedy in (False, True):
            if greedy and wrong.get("threshold") == -0.25:
                continue  # greedy decoding reads the criterion at one token per row: a small shift flips no row
            with pytest.raises(AssertionError):
                assert_same(fast_step(rl, base, cfg.replace(**wrong), greedy=greedy), rl, base, cfg, greedy)


def test_not_covered_configs_return_none():
    rl, base = pair()
    for kw in (dict(top_p=0.9), dict(top_k=5), dict(candidate_top_k=8), dict(view_top_k=5),
               dict(criterion="entropy", threshold=1.0), dict(gamma=-1.0), dict(criterion="always")):
        cfg = ExtrapolationConfig(**kw)
        assert not covers(cfg)
        assert fast_step(rl, base, cfg) is None


def test_mismatched_shapes_are_refused():
    rl, base = pair()
    cfg = ExtrapolationConfig()
    for b in (base[:1], base[:, :50], base[0]):  # would broadcast, or not line up
        with pytest.raises(ValueError, match="same shape"):
            fast_step(rl, b, cfg)


def test_non_finite_inputs_are_flagged():
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    for greedy in (False, True):
        for which in ("rl", "base"):
            rl, base = pair(mask=False)
            (rl if which == "rl" else base)[2, 5] = float("nan")
            step = fast_step(rl, base, cfg, greedy=greedy)
            assert not bool(torch.isfinite(step.finite[2])) and bool(torch.isfinite(step.finite[[0, 1, 3, 4]]).all())
        rl, base = pair(mask=False)
        base[0] = float("-inf")  # the base excludes every token
        assert not bool(torch.isfinite(fast_step(rl, base, cfg, greedy=greedy).finite[0]))


@pytest.mark.parametrize("rows", [1, 8, 9, 17])
def test_greedy_mass_is_float32_for_every_batch_size(rows):
    """Batches up to 8 rows share a cached 0 / 1 tensor per fire pattern, larger ones build one: both float32 and
    equal to the definition's mass."""
    rl, base = pair(rows=rows, vocab=50, mask=False, seed=rows)
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    fast = fast_step(rl, base, cfg, greedy=True)
    assert fast.mass.dtype == torch.float32 and fast.mass.shape == (rows,)
    assert_same(fast, rl, base, cfg, greedy=True)
