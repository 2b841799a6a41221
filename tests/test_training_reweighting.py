"""The pure reweighting math of `hf_extrapolate.training` against hand-computed values (no TRL needed)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from hf_extrapolate.training import (
    DEFAULT_ALPHA,
    REWEIGHTING_METHODS,
    ReweightingConfig,
    dominate_weights,
    lowprob_weights,
    ppl_sequence_weights,
    ppl_weights,
    reweight_advantages,
    sequence_log_perplexity,
    token_weights,
)

# Two responses of up to 3 tokens; the second has one padding token, whose log-prob is garbage on purpose.
P_OLD = torch.tensor([[0.5, 1.0, 0.1], [0.25, 0.5, 0.9]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([2.0, -1.0])


def _old_logprobs() -> torch.Tensor:
    logp = P_OLD.log()
    logp[1, 2] = float("nan")  # padding: must never reach the output
    return logp


def test_lowprob_matches_eq8_by_hand():
    # w = 1 + 0.2 * (1 - p): [1.1, 1.0, 1.18] and [1.15, 1.1, -]
    expected = torch.tensor([[2.0 * 1.1, 2.0 * 1.0, 2.0 * 1.18], [-1.0 * 1.15, -1.0 * 1.1, 0.0]])
    out = reweight_advantages(ADV, _old_logprobs(), MASK, method="lowprob", alpha=0.2)
    assert_close(out, expected)
    assert_close(lowprob_weights(_old_logprobs(), MASK, 0.1), torch.tensor([[1.05, 1.0, 1.09], [1.075, 1.05, 0.0]]))


def test_lowprob_upweights_low_probability_tokens_and_dominate_the_opposite():
    logp = torch.log(torch.tensor([[0.05, 0.5, 0.95]]))
    mask = torch.ones_like(logp)
    low = lowprob_weights(logp, mask, 0.2)[0]
    dom = dominate_weights(logp, mask, 0.2)[0]
    assert low[0] > low[1] > low[2] >= 1.0
    assert dom[0] < dom[1] < dom[2] <= 1.0


def test_dominate_matches_yang_by_hand():
    # w = 0.2 * p + 0.8: [0.9, 1.0, 0.82] and [0.85, 0.9, -]
    expected = torch.tensor([[2.0 * 0.9, 2.0 * 1.0, 2.0 * 0.82], [-1.0 * 0.85, -1.0 * 0.9, 0.0]])
    out = reweight_advantages(ADV, _old_logprobs(), MASK, method="dominate", alpha=0.2)
    assert_close(out, expected)


def test_ppl_weights_by_hand_within_groups():
    # Four responses, groups of two. log PPL = mean negative log-prob over response tokens only:
    # group 1: 1.0 and 3.0 -> z = -1, +1 -> w = 1.1, 0.9; group 2: equal log PPL -> z = 0 -> w = 1.
    logp = torch.tensor(
        [[-1.0, -1.0, -1.0], [-3.0, -3.0, -50.0], [-2.0, -2.0, -2.0], [-2.0, float("-inf"), float("nan")]]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert_close(sequence_log_perplexity(logp, mask), torch.tensor([1.0, 3.0, 2.0, 2.0]))
    adv = torch.tensor([1.0, 1.0, -2.0, 3.0])
    out = reweight_advantages(adv, logp, mask, method="ppl", alpha=0.1, group_size=2)
    expected = torch.tensor([[1.1, 1.1, 1.1], [0.9, 0.9, 0.0], [-2.0, -2.0, -2.0], [3.0, 0.0, 0.0]])
    assert_close(out, expected)
    # One group of four: mean 2, population std sqrt(0.5) -> z = [-sqrt 2, +sqrt 2, 0, 0].
    z = math.sqrt(2.0)
    assert_close(
        ppl_sequence_weights(torch.tensor([1.0, 3.0, 2.0, 2.0]), alpha=0.1),
        torch.tensor([1 + 0.1 * z, 1 - 0.1 * z, 1.0, 1.0]),
    )


def test_ppl_favours_low_perplexity_and_never_flips_the_sign():
    w = ppl_sequence_weights(torch.tensor([0.5, 4.0]), alpha=2.0)  # z = -1, +1 -> 1 + 2 = 3 and max(0, 1 - 2) = 0
    assert_close(w, torch.tensor([3.0, 0.0]))


def test_ppl_statistics_ignore_empty_responses():
    w = ppl_sequence_weights(torch.tensor([1.0, 3.0, 100.0]), alpha=0.1, valid=torch.tensor([True, True, False]))
    assert_close(w, torch.tensor([1.1, 0.9, 1.0]))
    logp = torch.zeros(2, 2)
    assert_close(ppl_weights(logp, torch.tensor([[1, 1], [0, 0]]), alpha=0.1), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("method", REWEIGHTING_METHODS)
def test_alpha_zero_is_the_identity_on_response_tokens(method):
    logp = torch.randn(4, 5).clamp(max=0.0) - 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    for adv in (torch.randn(4), torch.randn(4, 5)):
        expected = (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * mask
        assert_close(reweight_advantages(adv, logp, mask, method=method, alpha=0.0, group_size=2), expected)


def test_none_leaves_advantages_unchanged():
    assert_close(reweight_advantages(ADV, _old_logprobs(), MASK, method="none"), ADV.unsqueeze(-1) * MASK)
    assert_close(token_weights(_old_logprobs(), MASK, "none"), MASK.float())


def test_masked_tokens_stay_zero_even_with_nan_logprobs():
    for method in REWEIGHTING_METHODS:
        out = reweight_advantages(ADV, _old_logprobs(), MASK, method=method, alpha=0.3)
        assert torch.isfinite(out).all(), method
        assert out[1, 2].item() == 0.0 and not math.copysign(1.0, out[1, 2].item()) < 0, method


def test_advantage_shapes_b_b1_bt_agree():
    logp, mask = _old_logprobs(), MASK
    out_b = reweight_advantages(ADV, logp, mask, alpha=0.2)
    assert out_b.shape == (2, 3)
    assert_close(reweight_advantages(ADV.unsqueeze(-1), logp, mask, alpha=0.2), out_b)
    assert_close(reweight_advantages(ADV.unsqueeze(-1).expand(2, 3).clone(), logp, mask, alpha=0.2), out_b)
    with pytest.raises(ValueError, match="`advantages` must have shape"):
        reweight_advantages(torch.ones(3), logp, mask)


def test_default_alpha_is_the_papers_value():
    assert DEFAULT_ALPHA["lowprob"] == 0.2  # Qwen2.5-Math-7B (0.1 for Qwen3-8B-Base)
    assert_close(
        reweight_advantages(ADV, _old_logprobs(), MASK),
        reweight_advantages(ADV, _old_logprobs(), MASK, "lowprob", 0.2),
    )
    assert ReweightingConfig(method="dominate").alpha == DEFAULT_ALPHA["dominate"] == 0.2


def test_inputs_are_not_modified():
    adv, logp, mask = ADV.clone(), P_OLD.log(), MASK.clone()
    before = (adv.clone(), logp.clone(), mask.clone())
    for method in REWEIGHTING_METHODS:
        reweight_advantages(adv, logp, mask, method=method, alpha=0.2)
    for x, y in zip((adv, logp, mask), before):
        assert torch.equal(x, y)


def test_old_logprobs_carry_no_gradient():
    # On-policy, as in TRL: the ratio is exp(logp - logp.detach()) and p_old comes from the same logp. If the weights
    # were not detached, d/dlogp of the surrogate would pick up an extra alpha * p * A term.
    logp = P_OLD.log().clone().requires_grad_(True)
    adv = ADV.clone().requires_grad_(True)
    for method in ("lowprob", "dominate", "ppl"):
        logp.grad, adv.grad = None, None
        adv_hat = reweight_advantages(adv, logp, MASK, method=method, alpha=0.2)
        surrogate = -(torch.exp(logp - logp.detach()) * adv_hat * MASK).sum()
        surrogate.backward()
        assert_close(logp.grad, -adv_hat.detach(), msg=method)
        weights = token_weights(P_OLD.log(), MASK, method, 0.2)
        assert_close(adv.grad, -(weights).sum(-1), msg=method)  # the advantage itself keeps its gradient


def test_invalid_arguments_name_the_argument_and_the_fix():
    logp = _old_logprobs()
    with pytest.raises(ValueError, match=r"`method` \(='bogus'\) must be one of"):
        reweight_advantages(ADV, logp, MASK, method="bogus")
    with pytest.raises(ValueError, match=r"`alpha` \(=-0.1\) must be a finite real number >= 0"):
        reweight_advantages(ADV, logp, MASK, alpha=-0.1)
    with pytest.raises(ValueError, match=r"`alpha` \(=1.5\) must lie in \[0, 1\] for method='dominate'"):
        reweight_advantages(ADV, logp, MASK, method="dominate", alpha=1.5)
    with pytest.raises(ValueError, match=r"`group_size` \(=3\) must be a positive integer dividing"):
        reweight_advantages(ADV, logp, MASK, method="ppl", group_size=3)
    with pytest.raises(ValueError, match="`mask` must be a tensor of the same shape"):
        reweight_advantages(ADV, logp, MASK[:, :2])
    with pytest.raises(ValueError, match="`old_logprobs` must be a floating-point tensor of shape"):
        reweight_advantages(ADV, torch.ones(2, 3, dtype=torch.long), MASK)


def test_config_validates_and_round_trips():
    cfg = ReweightingConfig(method="lowprob", alpha=0.1)
    assert ReweightingConfig.from_dict(cfg.to_dict()) == cfg
    assert ReweightingConfig().to_dict() == {"method": "lowprob", "alpha": 0.2, "low_prob_threshold": 0.5}
    with pytest.raises(ValueError, match="`low_prob_threshold`"):
        ReweightingConfig(low_prob_threshold=0.0)
    with pytest.raises(TypeError, match="unknown field"):
        ReweightingConfig.from_dict({"method": "ppl", "gamma": 1.0})


def test_core_and_training_packages_do_not_need_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"  # simulate an install without the [train] extra
        "import hf_extrapolate\n"
        "assert 'hf_extrapolate.training' not in sys.modules\n"
        "import hf_extrapolate.training as t\n"
        "try:\n"
        "    t.DirectionalGRPOTrainer\n"
        "except ImportError as e:\n"
        "    assert 'hf_extrapolate[train]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("method", ["lowprob", "dominate", "ppl", "none"])
def test_non_logprobs_and_fractional_masks_are_refused(method):
    """Logits passed as log-probs would flip the advantage's sign (1 + 0.2 (1 - e^3) < 0): refused, as are +-inf,
    NaN on response tokens, non-finite advantages and a fractional mask."""
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    good = torch.log(torch.tensor([[0.5, 1.0], [0.25, 0.5]]))
    for bad, message in [
        (torch.tensor([[3.0, -1.0], [-1.0, -1.0]]), "not log-probabilities"),
        (torch.tensor([[float("inf"), -1.0], [-1.0, -1.0]]), "NaN or"),
        (torch.tensor([[-1.0, float("-inf")], [-1.0, -1.0]]), "NaN or"),
        (torch.tensor([[-1.0, -1.0], [float("nan"), -1.0]]), "NaN or"),
    ]:
        with pytest.raises(ValueError, match=message):
            reweight_advantages(adv, bad, mask, method=method)
    with pytest.raises(ValueError, match="only 0 and 1"):
        reweight_advantages(adv, good, torch.tensor([[1.0, 0.5], [1.0, 0.0]]), method=method)
    with pytest.raises(ValueError, match="`advantages` has NaN"):
        reweight_advantages(torch.tensor([float("nan"), 1.0]), good, mask, method=method)
    # rounding just above 0 (bf16 log_softmax of a near-certain token) and NaN on padding are accepted
    rounded = good.clone()
    rounded[0, 1] = 0.004
    out = reweight_advantages(adv, rounded, mask, method=method)
    torch.testing.assert_close(out, reweight_advantages(adv, good, mask, method=method))
    assert bool((out[mask.bool()].sign() == adv[:, None].expand(2, 2)[mask.bool()].sign()).all())
