"""`view_top_k`: the reference code's step (each engine shows only its top-k log-probs plus the drawn token).

The closed form of `hf_extrapolate.directional.top_k_view_step` is checked against an enumeration written here from
the procedure itself, in float64 with dicts and loops: for every drawn token y, build what each engine shows, gate,
redraw over the shown candidates with the reference's own top-p rule, and add up. A sampler of the two-stage procedure
checks the same thing statistically, and rejects the simple `p [no fire] + M r` form (the negative control).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_extrapolate import CRITERIA, ExtrapolationConfig, directional_step
from hf_extrapolate.directional import normalize_pair, top_k_view_step

V, K = 12, 4


def _pair(seed, rows=3, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rl = (torch.randn(rows, V, generator=g, dtype=dtype) * scale).log_softmax(-1)
    base = (torch.randn(rows, V, generator=g, dtype=dtype) * scale).log_softmax(-1)
    return rl, base


def _softmax(values):
    x = np.asarray(values, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference_top_p(logits, top_p):
    """The reference's rule: sort ascending, drop tokens whose cumulative mass <= 1 - top_p, keep the last one."""
    order = np.argsort(logits, kind="stable")
    cum = np.cumsum(_softmax(logits[order]))
    keep = ~(cum <= 1 - top_p)
    keep[-1] = True
    probs = np.zeros(len(logits))
    probs[order[keep]] = _softmax(logits[order][keep])
    return probs


def _full_warp(logp, temperature, top_p):
    return _reference_top_p(np.asarray(logp, np.float64) / temperature, top_p)


def _entropy(values):
    p = _softmax(list(values))
    return float(-(p * np.log(p)).sum())


def _kl(view, other_view):
    """KL(view || other aligned on view's tokens, pad = smallest value other shows), both renormalised."""
    tokens = list(view)
    pad = min(other_view.values())
    x = np.array([view[t] for t in tokens])
    o = np.array([other_view.get(t, pad) for t in tokens])
    px, po = _softmax(x), _softmax(o)
    return float((px * (np.log(px) - np.log(po))).sum())


def _view_metric(criterion, rl_view, base_view):
    if criterion == "entropy":
        return _entropy(base_view.values())
    if criterion == "rl_entropy":
        return _entropy(rl_view.values())
    if criterion == "kl":
        return _kl(rl_view, base_view)
    if criterion == "reverse_kl":
        return _kl(base_view, rl_view)
    return 0.5 * (_kl(rl_view, base_view) + _kl(base_view, rl_view))


def _enumerate(rl_row, base_row, cfg: ExtrapolationConfig, k: int):
    """q and M of the reference's step by enumerating the drawn token (dicts and loops, float64)."""
    lrl, lb = np.asarray(rl_row, np.float64), np.asarray(base_row, np.float64)
    prop, other = (lb, lrl) if cfg.proposal == "base" else (lrl, lb)
    top = [int(t) for t in np.argsort(-prop, kind="stable")[:k]]
    other_view = {int(t): other[t] for t in np.argsort(-other, kind="stable")[:k]}
    pad = min(other_view.values())
    p = _full_warp(prop, cfg.temperature, cfg.top_p)
    q, mass = np.zeros(V), 0.0
    for y in range(V):
        if p[y] == 0:
            continue
        main_view = {t: prop[t] for t in top}
        main_view[y] = prop[y]
        seen_other = {t: other_view.get(t, pad) for t in main_view}
        rl_at, base_at = (seen_other, main_view) if cfg.proposal == "base" else (main_view, seen_other)
        c, tau = cfg.criterion, cfg.threshold
        diff = rl_at[y] - base_at[y]
        if c == "random":
            f = tau
        elif c == "always":
            f = 1.0
        elif c == "never":
            f = 0.0
        elif c == "logp_diff":
            f = float(diff < tau)
        elif c == "logp_other_minus_proposal":
            f = float((diff if cfg.proposal == "base" else -diff) < tau)
        elif c == "logp_proposal_minus_other":
            f = float((-diff if cfg.proposal == "base" else diff) < tau)
        else:
            rl_view, base_view = (other_view, main_view) if cfg.proposal == "base" else (main_view, other_view)
            metric = _view_metric(c, rl_view, base_view)
            f = float(metric > tau)
        q[y] += p[y] * (1 - f)
        if f == 0:
            continue
        mass += p[y] * f
        tokens = list(main_view)
        logits = np.array([(1 + cfg.gamma) * rl_at[t] - cfg.gamma * base_at[t] for t in tokens]) / cfg.temperature
        redraw = _reference_top_p(logits, cfg.top_p)
        for t, prob in zip(tokens, redraw):
            q[t] += p[y] * f * prob
    return q, mass


def _threshold(criterion):
    return {"random": 0.3, "logp_diff": -0.3, "logp_other_minus_proposal": -0.3,
            "logp_proposal_minus_other": -0.3, "entropy": 1.2, "rl_entropy": 1.2}.get(criterion, 0.1)


CONFIGS = [
    dict(criterion=c, proposal=prop, gamma=0.1, top_p=top_p, threshold=_threshold(c))
    for c in CRITERIA
    for prop in ("base", "rl")
    for top_p in (1.0, 0.7)
] + [
    dict(criterion="logp_diff", threshold=-0.1, gamma=0.5, temperature=0.6, top_p=0.8),
    dict(criterion="logp_diff", threshold=0.2, gamma=-0.5, temperature=1.5, top_p=0.9, proposal="rl"),
    dict(criterion="entropy", threshold=1.3, gamma=2.0, top_p=0.5),
    dict(criterion="kl", threshold=0.05, gamma=0.0, top_p=0.95, temperature=0.8),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_view_step_matches_enumeration_of_the_reference_procedure(kw):
    cfg = ExtrapolationConfig(view_top_k=K, **kw)
    rl, base = _pair(0, rows=6)
    log_q, mass, log_r = top_k_view_step(rl, base, cfg)
    fired_outside = 0.0
    for i in range(rl.shape[0]):
        q, m = _enumerate(rl[i].numpy(), base[i].numpy(), cfg, K)
        torch.testing.assert_close(log_q[i].exp(), torch.from_numpy(q), atol=1e-12, rtol=1e-10)
        assert mass[i].item() == pytest.approx(m, abs=1e-12)
        # q = p (1 - f) + M r: the effective redraw distribution is what M r adds to the kept draws
        if m > 0:
            torch.testing.assert_close(log_r[i].exp().sum(), torch.tensor(1.0, dtype=torch.float64))
        fired_outside += m
    assert fired_outside > 0 or cfg.criterion == "never"


def test_the_enumeration_exercises_drawn_tokens_outside_the_top_k():
    """The case that makes the marginal non-trivial: a fired draw outside the proposal's top-k widens the redraw."""
    cfg = ExtrapolationConfig(view_top_k=K, criterion="always", gamma=0.1, top_p=1.0)  # top-p 0.7 cuts them off
    rl, base = _pair(0, rows=6)
    log_p = torch.log_softmax(base, -1)
    outside = log_p.exp().clone()
    outside.scatter_(-1, base.topk(K, dim=-1).indices, 0.0)
    assert outside.sum(-1).min() > 0.05  # every row has > 5% of its first draws outside the top-k
    # and that changes q: dropping the drawn token from the candidates (K only) is measurably different
    log_q, _, _ = top_k_view_step(rl, base, cfg)
    naive = _naive_top_k_only(rl, base, cfg)
    assert (log_q.exp() - naive).abs().sum(-1).min() > 1e-3


def _naive_top_k_only(rl, base, cfg):
    """The wrong simple form p [no fire] + M r_K (the drawn token not added to the candidates), for 'always'."""
    k = cfg.view_top_k
    other_seen = torch.maximum(rl, rl.topk(k, dim=-1).values[..., -1:])
    ext = ((1 + cfg.gamma) * other_seen - cfg.gamma * base) / cfg.temperature
    keep = torch.zeros_like(ext, dtype=torch.bool).scatter(-1, base.topk(k, dim=-1).indices, True)
    out = torch.zeros_like(ext)
    for i in range(ext.shape[0]):
        idx = keep[i].nonzero().squeeze(-1)
        out[i, idx] = torch.from_numpy(_reference_top_p(ext[i, idx].numpy(), cfg.top_p))
    return out


def test_view_covering_the_vocabulary_is_the_exact_step():
    """With view_top_k = V every engine shows everything: the reference's step is the exact step (top_k=0)."""
    rl, base = _pair(1, dtype=torch.float32)
    for c in CRITERIA:
        for proposal in ("base", "rl"):
            cfg = ExtrapolationConfig(criterion=c, threshold=_threshold(c), gamma=0.2, top_p=0.8, proposal=proposal)
            exact, m_exact = directional_step(rl, base, cfg)
            view, m_view = directional_step(rl, base, cfg.replace(view_top_k=V))
            torch.testing.assert_close(view, exact, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m_view, m_exact, atol=1e-6, rtol=0)


def test_float32_through_directional_step_matches_float64():
    cfg = ExtrapolationConfig(view_top_k=K, criterion="logp_diff", threshold=-0.3, gamma=0.1, top_p=0.7)
    rl, base = _pair(2)
    exact64 = top_k_view_step(rl, base, cfg)[0].exp()
    out32 = directional_step(rl.float(), base.float(), cfg)[0].exp()
    torch.testing.assert_close(out32.double(), exact64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["logp_diff", "entropy", "reverse_kl", "always"])
@pytest.mark.parametrize("proposal", ["base", "rl"])
def test_view_greedy_redraws_argmax_over_the_top_k(criterion, proposal):
    """Greedy: y0 = argmax p (inside the top-k, so the reference's redraw candidates are the top-k alone)."""
    # thresholds inside the range of each metric at the greedy tokens of these rows, so that both branches occur
    threshold = {"logp_diff": -1.2 if proposal == "base" else 1.0, "entropy": 1.28, "reverse_kl": 0.2}.get(criterion, 0)
    cfg = ExtrapolationConfig(view_top_k=K, criterion=criterion, threshold=threshold, gamma=0.3,
                              proposal=proposal, top_p=0.7)
    rl, base = _pair(3, rows=12, scale=1.5)
    scores, fired, _ = top_k_view_step(rl, base, cfg, greedy=True)
    n_fired = 0
    for i in range(rl.shape[0]):
        lrl, lb = rl[i].numpy(), base[i].numpy()
        prop, other = (lb, lrl) if proposal == "base" else (lrl, lb)
        y0 = int(np.argmax(prop))
        top = np.argsort(-prop, kind="stable")[:K]
        pad = np.sort(other)[::-1][K - 1]
        seen = np.maximum(other, pad)
        rl_at, base_at = (seen, lb) if proposal == "base" else (lrl, seen)
        ext = (1 + cfg.gamma) * rl_at - cfg.gamma * base_at
        best = int(top[np.argmax(ext[top])])
        fire = _gate_at(lrl, lb, cfg)
        assert fired[i].item() == float(fire)
        assert int(scores[i].argmax()) == (best if fire else y0)
        n_fired += fire
    assert 0 < n_fired < rl.shape[0] or criterion == "always"


def _gate_at(lrl, lb, cfg):
    """The gate on the greedy token y0, read off the enumeration: with the first draw on y0, M is f(y0)."""
    # temperature -> 0 puts the first draw on y0; the gate and the views do not depend on the temperature
    _, m = _enumerate(lrl, lb, cfg.replace(temperature=1e-4, top_p=1.0), K)
    return m > 0.5


def test_two_stage_sampler_matches_the_view_marginal_and_rejects_the_simple_form():
    """Draw y ~ p; if the gate (on the views) fires, redraw over top-k + {y}: the histogram must match q.

    The RL model proposes (Table 1): a token outside its top-k is shown with the base's k-th log-prob, so Δlogp is low
    there and the gate fires on it, which is where the drawn token widens the redraw's candidates.
    """
    cfg = ExtrapolationConfig(view_top_k=K, criterion="logp_diff", threshold=-0.2, gamma=0.5, top_p=0.95,
                              temperature=1.5, proposal="rl")
    rl, base = _pair(5, rows=1, scale=0.7)
    prop, other = rl[0].numpy(), base[0].numpy()
    rng = np.random.default_rng(0)
    n = 400_000
    p = _full_warp(prop, cfg.temperature, cfg.top_p)
    first = rng.choice(V, size=n, p=p)
    top = [int(t) for t in np.argsort(-prop, kind="stable")[:K]]
    other_view = {int(t): other[t] for t in np.argsort(-other, kind="stable")[:K]}
    pad = min(other_view.values())

    def redraw_over(tokens):
        logits = np.array([(1 + cfg.gamma) * prop[t] - cfg.gamma * other_view.get(t, pad) for t in tokens])
        return _reference_top_p(logits / cfg.temperature, cfg.top_p)

    fire = np.array([prop[y] - other_view.get(y, pad) < cfg.threshold for y in range(V)])
    out = first.copy()
    for y in np.nonzero(fire)[0]:
        rows = np.nonzero(first == y)[0]
        tokens = list(dict.fromkeys(top + [int(y)]))
        out[rows] = np.array(tokens)[rng.choice(len(tokens), size=len(rows), p=redraw_over(tokens))]
    counts = np.bincount(out, minlength=V).astype(np.float64)

    def chi2(q):
        keep = q > 0
        expected = n * q[keep]
        return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1

    def critical(df, z=3.29):  # Wilson-Hilferty, one-sided p = 5e-4
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3

    q = top_k_view_step(rl, base, cfg)[0][0].exp().numpy()
    assert counts[q == 0].sum() == 0
    stat, df = chi2(q)
    assert stat < critical(df), f"chi2={stat:.1f} for the view marginal"
    # negative controls: the simple form p [no fire] + M r_K (redraw over the top-k alone), and the exact step
    r_top = np.zeros(V)
    r_top[top] = redraw_over(top)
    simple = np.where(fire, 0.0, p) + (p * fire).sum() * r_top
    exact = directional_step(rl.float(), base.float(), cfg.replace(view_top_k=None))[0][0].exp().double().numpy()
    assert 0.5 * np.abs(simple - q).sum() > 0.02  # the drawn token's widening matters in this row
    for wrong in (simple, exact):
        impossible = counts[wrong == 0].sum()
        assert impossible > 0 or chi2(wrong)[0] > critical(df), "the test cannot tell the wrong form from q"


def test_gate_uses_the_smallest_shown_value_for_an_unshown_token():
    """(a): a token outside the RL model's top-k gets the k-th RL log-prob, so the gate reads it, not the true value."""
    rl = torch.tensor([[0.0, -1.0, -2.0, -9.0, -9.5]]).log_softmax(-1).double()
    base = torch.tensor([[0.0, -1.0, -2.0, -3.0, -3.2]]).log_softmax(-1).double()
    # true Δ of token 3 is about -6 (fires at tau=-0.5); shown with k=3 it is l_rl(2) - l_base(3), about +0.6
    cfg = ExtrapolationConfig(view_top_k=3, criterion="logp_diff", threshold=-0.5, top_p=1.0)
    exact = ExtrapolationConfig(criterion="logp_diff", threshold=-0.5, top_p=1.0)
    _, m_view, _ = top_k_view_step(rl, base, cfg)
    _, m_exact = directional_step(rl, base, exact)
    p = base.exp()[0]
    assert m_exact.item() == pytest.approx(float(p[3] + p[4]), rel=1e-5)
    assert m_view.item() == pytest.approx(0.0, abs=1e-12)


def test_view_never_produces_nan_with_masked_tokens():
    rl, base = _pair(5, dtype=torch.float32)
    scores = rl.clone()
    scores[:, [1, 4]] = float("-inf")
    for c in ("logp_diff", "entropy", "kl", "avg_kl", "random"):
        for greedy in (False, True):
            cfg = ExtrapolationConfig(view_top_k=K, criterion=c, threshold=_threshold(c), gamma=0.2, top_p=0.7)
            out, mass = directional_step(scores, base, cfg, greedy=greedy)
            assert not torch.isnan(out).any() and not torch.isnan(mass).any()
            assert torch.isneginf(out[:, [1, 4]]).all()
            torch.testing.assert_close(out.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)


def test_view_config_is_validated_and_round_trips():
    cfg = ExtrapolationConfig(view_top_k=50)
    assert ExtrapolationConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="view_top_k"):
            ExtrapolationConfig(view_top_k=bad)
    with pytest.raises(ValueError, match="candidate_top_k"):
        ExtrapolationConfig(view_top_k=50, candidate_top_k=50)
    with pytest.raises(ValueError, match="top_k"):
        ExtrapolationConfig(view_top_k=50, top_k=20)


def test_normalize_pair_then_view_is_what_directional_step_computes():
    cfg = ExtrapolationConfig(view_top_k=K, criterion="rl_entropy", threshold=1.0, gamma=0.1, top_p=0.9)
    rl, base = _pair(6, dtype=torch.float32)
    logits_rl, logits_base = rl * 1.0 + 3.0, base - 2.0  # unnormalised scores
    a = directional_step(logits_rl, logits_base, cfg)[0]
    b = top_k_view_step(*normalize_pair(rl, base), cfg)[0]
    torch.testing.assert_close(a, b)


def test_generate_with_the_view_samples_each_step_from_the_view_marginal():
    """Through `DirectionalModelForCausalLM.generate`: the scores generate samples from are the view step of the two
    models' logits at every position (recomputed here without cache)."""
    from hf_extrapolate import DirectionalModelForCausalLM

    from .tiny import EOS, PAD, tiny_llama

    rl_model, base_model = tiny_llama(0), tiny_llama(1)
    cfg = ExtrapolationConfig(view_top_k=8, criterion="logp_diff", threshold=-0.3, gamma=0.1, top_p=0.7)
    model = DirectionalModelForCausalLM.from_models(rl_model, base_model, cfg)
    inputs = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(0)
    out = model.generate(input_ids=inputs, do_sample=True, max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS,
                         return_dict_in_generate=True, output_scores=True)
    seq, width = out.sequences, inputs.shape[1]
    with torch.no_grad():
        rl_logits, base_logits = rl_model(seq).logits, base_model(seq).logits
    masses = []
    for t, scores in enumerate(out.scores):
        expected, mass = directional_step(rl_logits[:, width - 1 + t], base_logits[:, width - 1 + t], cfg)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
        masses.append(mass)
    torch.testing.assert_close(out.replace_ratio, torch.stack(masses, -1).mean(-1), atol=1e-6, rtol=0)
