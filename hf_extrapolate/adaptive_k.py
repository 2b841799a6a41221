"""Choosing the lookahead length k per round (`lookahead="auto"`) from the observed fire rate and measured costs.

A round drafts k tokens (k proposal forwards of one token, cost `k d`) and checks them in one forward of the other
model over k positions (cost `c(k)`). With a per-position fire probability f, a row emits, per round,

    A(k) = sum_{j=0}^{k-1} (1 - f)^j = (1 - (1 - f)^k) / f      (the drafts up to and including the first fire)

tokens, so the choice is `argmax_k A(k) / (k d + c(k))` over 1..k_max.

With the early stop (`lookahead.early_stop_rule`: the fire decisions are known from the proposer alone), a round
drafts n = the max over the R rows of each row's need min(first fire + 1, k) instead of k, with
`P(n <= m) = (1 - (1 - f)^m)^R` for m < k, so the choice is `argmax_k A(k) / E[n d + c(n)]` (`expected_cost`).
At R > 1 a round can instead stop at the first position where ANY row fires (`stop_any`): then every row emits all n
positions (n - 1 drafts and the redraw, or n drafts), nothing drafted is dropped, and `P(n <= m) = 1 - (1 - f)^(R m)`
for m < k; a round emits R E[n] tokens for `E[n d + c(n)]`. `plan` chooses k and the stop rule together.

- f is estimated from the rounds so far: fires / checked positions up to each row's first fire (the geometric
  likelihood), with a prior of `prior_fires / prior_positions` (5% over 20 positions).
- d is the mean time of one draft step; c(n) the mean time of a check over n positions (the other model's forward,
  the step math and the bookkeeping of the round: everything a round costs but its drafts) for every n seen so far,
  interpolated linearly in n between them (see `check_cost` for the ends). The measured costs are kept from one
  generation to the next by the caller (`DirectionalModelForCausalLM` keeps one chooser per batch size and device),
  the fire rate starts from the prior in every generation.

Exactness does not depend on k: the k of a round is chosen before any of that round's randomness is drawn, from
past rounds only, and every round emits tokens with the step-by-step distribution given the prefix whatever k is.
The choice depends on measured time, so with sampling the same seed can give different (equally distributed)
samples from run to run; greedy tokens do not depend on k. This module does not time anything itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def expected_accepted(rate: float, k: int) -> float:
    """A(k) = (1 - (1 - f)^k) / f: the expected tokens a row emits in a round of k drafts at fire rate f."""
    if rate <= 0.0:
        return float(k)
    if rate >= 1.0:
        return 1.0
    return (1.0 - (1.0 - rate) ** k) / rate


def drafted_distribution(rate: float, k: int, rows: int) -> list[float]:
    """P(n = m) for m = 1..k: the positions a round of at most k drafts covers with the early stop, over `rows` rows
    that fire independently at rate f per position (each row needs min(first fire + 1, k) positions)."""
    rate = min(max(rate, 0.0), 1.0)
    below = [(1.0 - (1.0 - rate) ** m) ** rows for m in range(k)] + [1.0]  # P(n <= m), m = 0..k
    return [below[m] - below[m - 1] for m in range(1, k + 1)]


def any_drafted_distribution(rate: float, k: int, rows: int) -> list[float]:
    """P(n = m) for m = 1..k when a round stops at the first position where any of `rows` rows fires (rate f each,
    independently) or at k."""
    rate = min(max(rate, 0.0), 1.0)
    below = [1.0 - (1.0 - rate) ** (rows * m) for m in range(k)] + [1.0]
    return [below[m] - below[m - 1] for m in range(1, k + 1)]


def round_value(rate: float, k: int, rows: int, stop_any: bool, cost: Callable[[int], float]) -> float:
    """Expected tokens per second of an early-stopping round of at most k drafts over `rows` rows, where `cost(m)`
    is the seconds of a round over m positions (m drafts and the check): every row emits A(k) tokens when the round
    stops once all rows fired (`stop_any=False`), all n when it stops at the first fire of any row."""
    if stop_any:
        probs = any_drafted_distribution(rate, k, rows)
        tokens = rows * sum(m * prob for m, prob in enumerate(probs, start=1))
    else:
        probs = drafted_distribution(rate, k, rows)
        tokens = rows * expected_accepted(rate, k)
    return tokens / sum(prob * cost(m) for m, prob in enumerate(probs, start=1) if prob > 0)


def default_stop_any(rate: float, k: int, rows: int) -> bool:
    """The stop rule of a fixed-k early-stopping round when nothing is timed: a check over n positions assumed to
    cost one draft step (a chunk forward, about right for small chunks), the rule with more tokens per second."""
    if rows <= 1:
        return False  # the same round either way
    return round_value(rate, k, rows, True, lambda m: m + 1.0) > round_value(rate, k, rows, False, lambda m: m + 1.0)


class AdaptiveLookahead:
    """The per-round choice of k: `choose(rows)` before a round, `observe(...)` after it.

    Costs are kept per number of rows in the forward (rows that are done leave the batch, and a forward of fewer
    rows costs less); a row count never timed uses the nearest one that was.
    """

    def __init__(self, k_max: int = 16, k_start: int = 8, prior_fires: float = 1.0, prior_positions: float = 20.0):
        if k_max < 1 or not 1 <= k_start <= k_max:
            raise ValueError(f"need 1 <= k_start (={k_start}) <= k_max (={k_max}).")
        self.k_max, self.k_start = k_max, k_start
        self.prior_fires, self.prior_positions = prior_fires, prior_positions
        self.fires, self.positions = prior_fires, prior_positions
        self.draft_time: dict[int, float] = {}  # rows -> summed seconds of draft steps
        self.draft_steps: dict[int, int] = {}
        self.check_time: dict[int, dict[int, float]] = {}  # rows -> n -> summed seconds
        self.check_count: dict[int, dict[int, int]] = {}

    @property
    def rate(self) -> float:
        return self.fires / self.positions

    def start(self) -> None:
        """A new generation: the fire rate starts again from the prior, the measured costs are kept."""
        self.fires, self.positions = self.prior_fires, self.prior_positions

    def observe(
        self, checked: int, fired: int, n: int, draft_seconds: float | None = None,
        check_seconds: float | None = None, rows: int = 1,
    ) -> None:
        """One round: `checked` positions examined up to each row's first fire (inclusive), `fired` rows that fired,
        `n` drafts per row, the time of the n draft steps and of the rest of the round (None: not timed), over
        `rows` rows."""
        self.fires += fired
        self.positions += checked
        if draft_seconds is None or check_seconds is None:
            return
        self.draft_time[rows] = self.draft_time.get(rows, 0.0) + draft_seconds
        self.draft_steps[rows] = self.draft_steps.get(rows, 0) + n
        times, counts = self.check_time.setdefault(rows, {}), self.check_count.setdefault(rows, {})
        times[n] = times.get(n, 0.0) + check_seconds
        counts[n] = counts.get(n, 0) + 1

    def _timed_rows(self, rows: int) -> int | None:
        if not self.draft_steps:
            return None
        return min(self.draft_steps, key=lambda r: (abs(r - rows), -r))

    def draft_cost(self, rows: int = 1) -> float:
        """d in seconds: the mean draft step (of the nearest row count timed)."""
        r = self._timed_rows(rows)
        return self.draft_time[r] / self.draft_steps[r]

    def check_cost(self, n: int, rows: int = 1) -> float:
        """c(n) in seconds: the mean of the checks over n positions for the n seen, interpolated linearly between
        them; below the smallest n seen, that n's cost (a shorter check is not assumed cheaper until seen); above the
        largest, the last slope (with one n seen: the slope of the line from a one-token check at one draft step)."""
        r = self._timed_rows(rows)
        points = {m: self.check_time[r][m] / self.check_count[r][m] for m in self.check_time[r]}
        xs = sorted(points)
        if n in points:
            return points[n]
        if n < xs[0]:
            return points[xs[0]]
        if n > xs[-1]:
            if len(xs) > 1:
                lo, hi = xs[-2], xs[-1]
                slope = (points[hi] - points[lo]) / (hi - lo)
            else:
                d = self.draft_cost(rows)
                slope = (points[xs[-1]] - d) / (xs[-1] - 1) if xs[-1] > 1 else 0.0
            return points[xs[-1]] + max(slope, 0.0) * (n - xs[-1])
        hi = next(x for x in xs if x > n)
        lo = max(x for x in xs if x < n)
        return points[lo] + (points[hi] - points[lo]) * (n - lo) / (hi - lo)

    def expected_cost(self, k: int, rows: int = 1, early_stop: bool = False) -> float:
        """The expected seconds of a round of at most k drafts: `k d + c(k)`, or with the early stop
        `sum_m P(n = m) (m d + c(m))` (`drafted_distribution` at the current fire rate)."""
        d = self.draft_cost(rows)
        if not early_stop:
            return k * d + self.check_cost(k, rows)
        probs = drafted_distribution(self.rate, k, rows)
        return sum(prob * (m * d + self.check_cost(m, rows)) for m, prob in enumerate(probs, start=1) if prob > 0)

    def plan(self, rows: int = 1, early_stop: bool = False) -> tuple[int, bool]:
        """(k, stop_any) of the next round: with `early_stop` and rows > 1, the k and stop rule with the most
        expected tokens per second (`round_value`); otherwise `(choose(rows, early_stop), False)`."""
        if not early_stop or rows <= 1:
            return self.choose(rows, early_stop), False
        if not self.draft_steps:  # nothing timed yet: k_start, the stop rule of a fixed k
            return self.k_start, default_stop_any(self.rate, self.k_start, rows)
        d, rate = self.draft_cost(rows), self.rate

        def cost(m: int) -> float:
            return m * d + self.check_cost(m, rows)

        best, best_value = (1, False), -math.inf
        for stop_any in (False, True):
            for k in range(1, self.k_max + 1):
                value = round_value(rate, k, rows, stop_any, cost)
                if value > best_value * (1.0 + 1e-9):
                    best, best_value = (k, stop_any), value
        return best

    def choose(self, rows: int = 1, early_stop: bool = False) -> int:
        """The k of the next round for `rows` rows (k_start until a round has been timed); `early_stop`: rounds
        stop drafting at the rows' first fires (see `expected_cost`)."""
        if not self.draft_steps:
            return self.k_start
        rate = self.rate
        best, best_value = 1, -math.inf
        for k in range(1, self.k_max + 1):
            value = expected_accepted(rate, k) / self.expected_cost(k, rows, early_stop)
            if value > best_value * (1.0 + 1e-9):
                best, best_value = k, value
        return best
