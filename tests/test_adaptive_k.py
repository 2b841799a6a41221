"""The per-round choice of k (`lookahead="auto"`): the expected-tokens formula, the cost interpolation and the argmax.

That every emitted token keeps the step-by-step distribution whatever k is chosen is tested in test_lookahead.py
(greedy tokens, scores against a full recompute, exact enumeration, all with `lookahead="auto"`).
"""

from __future__ import annotations

import pytest

from hf_extrapolate.adaptive_k import (
    AdaptiveLookahead,
    any_drafted_distribution,
    default_stop_any,
    drafted_distribution,
    expected_accepted,
    round_value,
)


def first_fire_expectation(rate: float, k: int) -> float:
    """E[tokens emitted in a round] from its definition: the first fire at j emits j tokens, no fire emits k."""
    no_fire_before = 1.0
    total = 0.0
    for j in range(1, k + 1):
        total += j * no_fire_before * rate
        no_fire_before *= 1.0 - rate
    return total + k * no_fire_before


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_expected_accepted_is_the_expectation_of_a_round(rate):
    for k in range(1, 17):
        assert expected_accepted(rate, k) == pytest.approx(first_fire_expectation(rate, k), rel=1e-12)


def observed(rate: float, cost: dict[int, float], draft: float = 1.0, positions: int = 100_000) -> AdaptiveLookahead:
    """A chooser that has seen `positions` positions at fire rate `rate`, draft steps of `draft` seconds and a check
    over n positions costing `cost[n]`."""
    chooser = AdaptiveLookahead(prior_fires=0.0, prior_positions=1e-9)
    chooser.observe(positions, int(round(rate * positions)), 1, draft, cost.get(1, draft))
    for n, seconds in cost.items():
        if n != 1:
            chooser.observe(0, 0, n, n * draft, seconds)
    return chooser


def test_check_cost_is_interpolated_between_the_lengths_seen():
    chooser = observed(0.05, {4: 2.0, 8: 4.0}, draft=1.0)
    assert chooser.check_cost(1) == pytest.approx(1.0)  # nothing seen at 1: a one-token check costs one draft step
    assert chooser.check_cost(2) == pytest.approx(1.0 + (2.0 - 1.0) / 3)  # between (1, 1.0) and (4, 2.0)
    assert chooser.check_cost(6) == pytest.approx(3.0)
    assert chooser.check_cost(12) == pytest.approx(6.0)  # past the largest n: the last slope (0.5 / position)


def test_check_cost_ends_one_length_seen():
    chooser = AdaptiveLookahead()
    chooser.observe(10, 1, 8, draft_seconds=8.0, check_seconds=2.4, rows=4)  # d = 1, c(8) = 2.4 at 4 rows
    assert chooser.check_cost(4, rows=4) == pytest.approx(2.4)  # shorter checks are not assumed cheaper until seen
    assert chooser.check_cost(12, rows=4) == pytest.approx(2.4 + 4 * (2.4 - 1.0) / 7)  # the line from (1, d)
    chooser.start()  # a new generation: the rate is the prior again, the costs stay
    assert chooser.rate == pytest.approx(1.0 / 20.0) and chooser.check_cost(8, rows=4) == pytest.approx(2.4)
    # costs are kept per row count; a row count never timed uses the nearest one timed
    chooser.observe(0, 0, 8, draft_seconds=4.0, check_seconds=0.8, rows=1)
    assert chooser.check_cost(8, rows=1) == pytest.approx(0.8) and chooser.draft_cost(1) == pytest.approx(0.5)
    assert chooser.check_cost(8, rows=3) == pytest.approx(2.4) and chooser.draft_cost(3) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "rate,cost",
    [
        (0.05, {n: 1.0 + 0.1 * (n - 1) for n in range(1, 17)}),  # CPU-like: a chunk costs more with its length
        (0.05, {n: 1.0 for n in range(1, 17)}),  # GPU-like: a chunk costs one step
        (0.20, {n: 1.5 + 0.07 * n for n in range(1, 17)}),
        (0.01, {n: 1.0 + 0.1 * (n - 1) for n in range(1, 17)}),
    ],
)
def test_choose_maximises_expected_tokens_per_second(rate, cost):
    chooser = observed(rate, cost)
    best = max(range(1, 17), key=lambda k: first_fire_expectation(rate, k) / (k + cost[k]))
    assert chooser.choose() == best


def test_extremes_and_the_start():
    assert AdaptiveLookahead(k_start=8).choose() == 8  # nothing observed yet
    assert observed(0.0, {1: 1.0, 16: 2.0}).choose() == 16  # nothing ever fires: draft as far as allowed
    assert observed(1.0, {1: 1.0, 16: 2.0}).choose() == 1  # everything fires: one draft per round
    with pytest.raises(ValueError, match="k_start"):
        AdaptiveLookahead(k_max=4, k_start=8)


def drafted_by_simulation(rate: float, k: int, rows: int, trials: int = 200_000) -> list[float]:
    """P(n = m) for m = 1..k from its definition: n = max over rows of min(first fire + 1, k)."""
    import random

    rng = random.Random(0)
    counts = [0] * k
    for _ in range(trials):
        n = 0
        for _ in range(rows):
            need = k
            for j in range(k):
                if rng.random() < rate:
                    need = j + 1
                    break
            n = max(n, need)
        counts[n - 1] += 1
    return [c / trials for c in counts]


@pytest.mark.parametrize("rate,k,rows", [(0.05, 8, 1), (0.3, 6, 1), (0.2, 5, 4), (0.0, 4, 2), (1.0, 4, 3)])
def test_drafted_distribution_of_the_early_stop(rate, k, rows):
    probs = drafted_distribution(rate, k, rows)
    assert len(probs) == k and sum(probs) == pytest.approx(1.0) and min(probs) >= 0.0
    if rows == 1:  # one row drafts min(first fire + 1, k): its mean is A(k)
        assert sum(m * p for m, p in enumerate(probs, start=1)) == pytest.approx(expected_accepted(rate, k))
    if 0.0 < rate < 1.0:
        for p, sim in zip(probs, drafted_by_simulation(rate, k, rows, 40_000), strict=True):
            assert p == pytest.approx(sim, abs=0.01)
    else:
        assert probs[(k if rate == 0.0 else 1) - 1] == pytest.approx(1.0)


@pytest.mark.parametrize("rows", [1, 4])
def test_choose_with_the_early_stop_maximises_expected_tokens_per_second(rows):
    rate, cost = 0.05, {n: 1.6 + 0.15 * (n - 1) for n in range(1, 17)}  # c(1) > d: a check costs more than a draft
    chooser = observed(rate, cost)
    chooser.observe(0, 0, 1, 1.0, cost[1], rows=rows)
    for n in range(2, 17):
        chooser.observe(0, 0, n, n * 1.0, cost[n], rows=rows)

    def value(k):
        probs = drafted_distribution(rate, k, rows)
        return first_fire_expectation(rate, k) / sum(p * (m + cost[m]) for m, p in enumerate(probs, start=1))

    best = max(range(1, 17), key=value)
    assert chooser.choose(rows, early_stop=True) == best
    plain = max(range(1, 17), key=lambda k: first_fire_expectation(rate, k) / (k + cost[k]))
    assert chooser.choose(rows) == plain
    if rows == 1:  # a round costs what it emits plus one check: the longer the better
        assert best == 16 and plain < 16


@pytest.mark.parametrize("rate,k,rows", [(0.05, 8, 4), (0.3, 5, 2), (0.0, 4, 3), (1.0, 4, 3)])
def test_any_drafted_distribution(rate, k, rows):
    probs = any_drafted_distribution(rate, k, rows)
    assert len(probs) == k and sum(probs) == pytest.approx(1.0) and min(probs) >= 0.0
    # stopping at the first fire of any of R rows is one row firing at 1 - (1 - f)^R: at most k, A(k) at that rate
    mean = sum(m * p for m, p in enumerate(probs, start=1))
    assert mean == pytest.approx(expected_accepted(1.0 - (1.0 - rate) ** rows, k))
    assert any_drafted_distribution(rate, k, 1) == pytest.approx(drafted_distribution(rate, k, 1))


def test_plan_chooses_k_and_the_stop_rule():
    cost = {n: 1.0 for n in range(1, 17)}  # a check of any length costs one draft step
    for rows, rate in ((4, 0.05), (64, 0.05), (4, 0.01)):
        chooser = observed(rate, {})
        for n in range(1, 17):
            chooser.observe(0, 0, n, n * 1.0, cost[n], rows=rows)
        options = [(k, s) for s in (False, True) for k in range(1, 17)]
        best = max(options, key=lambda o: round_value(rate, o[0], rows, o[1], lambda m: m + cost[m]))
        assert chooser.plan(rows, early_stop=True) == best
        assert chooser.plan(rows, early_stop=False) == (chooser.choose(rows), False)
    assert AdaptiveLookahead().plan(1, early_stop=True) == (8, False)  # untimed, one row: k_start
    assert default_stop_any(0.05, 8, 4) and not default_stop_any(0.05, 8, 64) and not default_stop_any(0.05, 8, 1)
