"""The step distribution against closed forms computed independently (float64 NumPy, explicit loops)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from hf_extrapolate import CRITERIA, ExtrapolationConfig, directional_logprobs, directional_step

V = 7


def _pair(seed: int = 0, rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    rl = (torch.randn(rows, V, generator=g) * 1.5).log_softmax(-1)
    base = (torch.randn(rows, V, generator=g) * 1.5).log_softmax(-1)
    return rl, base


def _np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def _np_warp(logp, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, top-k (ties kept), top-p (transformers: drop tokens whose ascending cumulative mass <= 1 - top_p)."""
    x = np.asarray(logp, dtype=np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        probs = _np_softmax(x)
        order = np.argsort(x, kind="stable")
        cum = np.cumsum(probs[order])
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.copy()
        x[order[remove]] = -np.inf
    return _np_softmax(x)


def _np_metric(criterion, prl, pb):
    def h(p):
        return -sum(v * math.log(v) for v in p if v > 0)

    def kl(p, q):
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)

    return {
        "entropy": h(pb),
        "rl_entropy": h(prl),
        "kl": kl(prl, pb),
        "reverse_kl": kl(pb, prl),
        "avg_kl": 0.5 * (kl(prl, pb) + kl(pb, prl)),
    }[criterion]


def _np_q(rl_row, base_row, cfg: ExtrapolationConfig):
    """q(y) = p(y) [no fire] + M r(y), every piece from scratch in float64."""
    lrl, lb = np.asarray(rl_row, np.float64), np.asarray(base_row, np.float64)
    V = len(lrl)
    prl, pb = np.exp(lrl), np.exp(lb)
    allowed = np.isfinite(lrl)  # tokens masked upstream stay impossible
    prop = lb if cfg.proposal == "base" else lrl
    p = _np_warp(prop, cfg.temperature, cfg.top_k, cfg.top_p)
    ext = np.full(V, -np.inf)
    ext[allowed] = (1 + cfg.gamma) * lrl[allowed] - cfg.gamma * lb[allowed]
    if cfg.candidate_top_k:
        top = np.argsort(-prop, kind="stable")[: cfg.candidate_top_k]
        ext = np.where(np.isin(np.arange(V), top), ext, -np.inf)
    r = _np_warp(ext, cfg.temperature, cfg.top_k, cfg.top_p)
    c, tau = cfg.criterion, cfg.threshold
    if c == "random":
        return (1 - tau) * p + tau * r, tau, p, r
    if c == "logp_diff":
        fire = np.array([bool(allowed[y]) and lrl[y] - lb[y] < tau for y in range(V)])
    elif c in ("logp_other_minus_proposal", "logp_proposal_minus_other"):
        lp, lo = (lb, lrl) if cfg.proposal == "base" else (lrl, lb)
        diff = lo - lp if c == "logp_other_minus_proposal" else lp - lo
        fire = np.array([bool(allowed[y]) and diff[y] < tau for y in range(V)])
    elif c == "always":
        fire = np.ones(V, bool)
    elif c == "never":
        fire = np.zeros(V, bool)
    else:
        fire = np.full(V, _np_metric(c, prl, pb) > tau)
    m = float(sum(p[y] for y in range(V) if fire[y]))
    return np.where(fire, 0.0, p) + m * r, m, p, r


def _threshold(criterion):
    return {"random": 0.3, "logp_diff": -0.3, "entropy": 1.5, "rl_entropy": 1.5}.get(criterion, 0.2)


CONFIGS = [
    dict(criterion=c, proposal=prop, gamma=g, threshold=_threshold(c))
    for c in CRITERIA
    for prop in ("base", "rl")
    for g in (0.0, 0.1)
] + [
    dict(criterion="logp_diff", threshold=-0.2, gamma=0.5, temperature=0.7, top_p=0.8),
    dict(criterion="logp_diff", threshold=0.1, gamma=0.1, top_k=3, proposal="rl"),
    dict(criterion="kl", threshold=0.05, gamma=-0.3, candidate_top_k=3, top_p=0.9),
    dict(criterion="logp_diff", threshold=-0.3, gamma=0.1, candidate_top_k=2),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sampling_distribution_matches_closed_form(kw):
    cfg = ExtrapolationConfig(**kw)
    rl, base = _pair(1)
    log_q, mass = directional_step(rl, base, cfg)
    for i in range(rl.shape[0]):
        q, m, _, _ = _np_q(rl[i].numpy(), base[i].numpy(), cfg)
        torch.testing.assert_close(log_q[i].exp().double(), torch.from_numpy(q), atol=1e-6, rtol=1e-5)
        assert mass[i].item() == pytest.approx(m, abs=1e-6)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(rl.shape[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_greedy_token_matches_closed_form(kw):
    if kw["criterion"] == "random":
        pytest.skip("random greedy draws are covered by test_greedy_random_fires_at_rate")
    cfg = ExtrapolationConfig(**kw)
    rl, base = _pair(2, rows=6)
    scores, fired = directional_step(rl, base, cfg, greedy=True)
    for i in range(rl.shape[0]):
        _, _, p, r = _np_q(rl[i].numpy(), base[i].numpy(), cfg)
        y0 = int(np.argmax(p))
        lrl, lb = rl[i].double().numpy(), base[i].double().numpy()
        c = cfg.criterion
        if c == "logp_diff":
            fire = lrl[y0] - lb[y0] < cfg.threshold
        elif c in ("logp_other_minus_proposal", "logp_proposal_minus_other"):
            lp, lo = (lb, lrl) if cfg.proposal == "base" else (lrl, lb)
            fire = (lo[y0] - lp[y0] if c == "logp_other_minus_proposal" else lp[y0] - lo[y0]) < cfg.threshold
        elif c in ("always", "never"):
            fire = c == "always"
        else:
            fire = _np_metric(c, np.exp(lrl), np.exp(lb)) > cfg.threshold
        expected = int(np.argmax(r)) if fire else y0
        assert int(scores[i].argmax()) == expected
        assert fired[i].item() == float(fire)


def test_greedy_random_fires_at_rate():
    cfg = ExtrapolationConfig(criterion="random", threshold=0.25)
    rl, base = _pair(3, rows=1)
    rl, base = rl.expand(20000, V), base.expand(20000, V)
    _, fired = directional_step(rl, base, cfg, greedy=True, generator=torch.Generator().manual_seed(0))
    assert fired.mean().item() == pytest.approx(0.25, abs=0.015)


def test_random_zero_and_one_are_proposal_and_replacement():
    rl, base = _pair(4)
    p = directional_logprobs(rl, base, ExtrapolationConfig(criterion="never", gamma=0.2))
    r = directional_logprobs(rl, base, ExtrapolationConfig(criterion="always", gamma=0.2))
    torch.testing.assert_close(directional_logprobs(rl, base, criterion="random", threshold=0.0, gamma=0.2), p)
    torch.testing.assert_close(directional_logprobs(rl, base, criterion="random", threshold=1.0, gamma=0.2), r)


def test_always_with_gamma_zero_is_the_rl_model_and_never_is_the_proposal():
    rl, base = _pair(5)
    torch.testing.assert_close(directional_logprobs(rl, base, criterion="always"), rl)
    torch.testing.assert_close(directional_logprobs(rl, base, criterion="never", proposal="base"), base)
    torch.testing.assert_close(directional_logprobs(rl, base, criterion="never", proposal="rl"), rl)


def test_extrapolation_is_the_geometric_tilt():
    """r = pi_rl^(1+g) / pi_base^g, normalised."""
    rl, base = _pair(6)
    g = 0.3
    r = directional_logprobs(rl, base, criterion="always", gamma=g).exp().double()
    expected = rl.double().exp() ** (1 + g) / base.double().exp() ** g
    torch.testing.assert_close(r, expected / expected.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [-2.0, -1.0, -0.5, 0.0, 0.1, 3.0])
@pytest.mark.parametrize("criterion", ["logp_diff", "avg_kl", "random", "always"])
def test_upstream_masks_are_kept_and_no_nan(gamma, criterion):
    rl, base = _pair(7)
    scores = rl.clone()
    scores[:, [1, 4]] = float("-inf")  # e.g. bad words / min length from an upstream processor
    base = base.clone()
    base[0, 2] = float("-inf")  # a base log-prob that underflowed
    before = scores.clone()
    thr = 0.5 if criterion == "random" else -0.3
    for greedy in (False, True):
        out, mass = directional_step(scores, base, ExtrapolationConfig(criterion=criterion, threshold=thr, gamma=gamma), greedy=greedy)
        assert not torch.isnan(out).any() and not torch.isnan(mass).any()
        assert torch.isneginf(out[:, [1, 4]]).all()
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, before)  # never edited in place


def test_inputs_not_modified_and_dtype_fp32():
    rl, base = _pair(8)
    rl16, base16 = rl.to(torch.bfloat16), base.to(torch.bfloat16)
    a, b = rl16.clone(), base16.clone()
    out = directional_logprobs(rl16, base16, gamma=0.1)
    assert out.dtype == torch.float32
    assert torch.equal(rl16, a) and torch.equal(base16, b)


def test_two_stage_sampler_matches_q_statistically():
    """Draw y ~ p; if the criterion fires on y, redraw from r. The histogram must match q and reject wrong formulas."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=0.0, gamma=0.5, top_p=0.9)
    rl, base = _pair(9, rows=1)
    from hf_extrapolate.directional import normalize_pair, proposal_and_replacement

    lrl, lb = normalize_pair(rl, base)
    log_p, log_r = proposal_and_replacement(lrl, lb, cfg)
    fire = (lrl - lb) < cfg.threshold
    n = 400_000
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(log_p.exp().expand(n, V), 1, generator=g).squeeze(-1)
    redraw = torch.multinomial(log_r.exp().expand(n, V), 1, generator=g).squeeze(-1)
    samples = torch.where(fire[0, y], redraw, y)
    counts = torch.bincount(samples, minlength=V).double()

    def chi2(q):
        keep = q > 0
        expected = n * q[keep]
        return (((counts[keep] - expected) ** 2) / expected).sum().item(), int(keep.sum()) - 1

    def critical(df, z=3.29):  # Wilson-Hilferty, one-sided p = 5e-4
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3

    q = directional_logprobs(rl, base, cfg)[0].exp().double()
    stat, df = chi2(q)
    assert stat < critical(df), f"chi2={stat:.1f} for the exact q"
    assert (counts[q == 0] == 0).all()
    # negative controls: plausible but wrong formulas are rejected by the same test
    p, r = log_p[0].exp().double(), log_r[0].exp().double()
    m = (p * fire[0]).sum()
    wrong_no_renorm = torch.where(fire[0], 0.0, p) + r * (1 - m)  # mixes with the kept mass instead of M
    wrong_no_renorm = wrong_no_renorm / wrong_no_renorm.sum()
    wrong_rl_mix = (1 - m) * p + m * r  # treats the token-level criterion as a position-level coin
    for wrong in (wrong_no_renorm, wrong_rl_mix):
        assert chi2(wrong)[0] > critical(df)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        directional_logprobs(torch.zeros(2, 5), torch.zeros(2, 6))


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(criterion="entropyy"), "criterion"),
        (dict(proposal="sft"), "proposal"),
        (dict(criterion="random", threshold=1.5), r"\[0, 1\]"),
        (dict(temperature=0.0), "temperature.*do_sample=False"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(candidate_top_k=0), "candidate_top_k"),
        (dict(gamma=float("inf")), "gamma"),
        (dict(threshold=float("nan")), "threshold"),
    ],
)
def test_config_rejects_bad_values_with_a_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        ExtrapolationConfig(**kw)


def test_config_round_trips(tmp_path):
    cfg = ExtrapolationConfig(proposal="rl", criterion="avg_kl", threshold=0.4, gamma=0.05, top_p=0.7, candidate_top_k=50)
    assert ExtrapolationConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json_file(tmp_path / "c.json")
    assert ExtrapolationConfig.from_json_file(tmp_path / "c.json") == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert cfg.to_json_string() == ExtrapolationConfig.from_dict(cfg.to_dict()).to_json_string()
    with pytest.raises(TypeError, match="unknown field"):
        ExtrapolationConfig.from_dict({"gama": 0.1})
    with pytest.raises(TypeError, match="unknown field"):
        cfg.replace(treshold=0.1)


def test_config_is_immutable_after_validation():
    cfg = ExtrapolationConfig(gamma=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = float("nan")  # would bypass __post_init__'s validation
    with pytest.raises(ValueError, match="gamma"):
        cfg.replace(gamma=float("nan"))
    assert cfg.gamma == 0.1
