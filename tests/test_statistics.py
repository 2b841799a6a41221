"""`ReplacementStats` keeps steps by position and fills its tables when read: the same tables as writing every step
into dense (R, n) tensors at once (the reference below), for any order of records, re-evaluations and reorders."""

from __future__ import annotations

import random

import torch

from hf_extrapolate.statistics import ReplacementStats


class DenseStats:
    """The eager reference: every call writes the dense tables immediately."""

    def __init__(self, prompt_length, rows):
        self.prompt_length = prompt_length
        self.mass = torch.zeros(rows, 400)
        self.posterior = torch.full((rows, 400), float("nan"))

    def record(self, position, mass, posterior=None):
        c = position - self.prompt_length
        self.mass[:, c] = mass
        self.posterior[:, c] = float("nan") if posterior is None else posterior

    def record_posterior(self, position, posterior):
        self.posterior[:, position - self.prompt_length] = posterior

    def reorder(self, idx):
        self.mass, self.posterior = self.mass[idx], self.posterior[idx]


def test_lazy_tables_equal_eager_writes_under_reevaluation_growth_and_reorders():
    rng = random.Random(0)
    rows, prompt = 3, 5
    for _trial in range(20):
        lazy, dense = ReplacementStats(), DenseStats(prompt, rows)
        lazy.reset(prompt)
        last = prompt - 1
        for _ in range(rng.choice([10, 150])):  # 150 steps: the table grows past its first 64 columns
            op = rng.random()
            if op < 0.12 and last >= prompt:  # assisted decoding re-evaluates an earlier position
                position = rng.randint(prompt, last)
            else:
                position = last + 1
            mass = torch.rand(rows)
            greedy = rng.random() < 0.3
            lazy.record(position, mass, posterior=mass if greedy else None)
            dense.record(position, mass, posterior=mass if greedy else None)
            last = max(last, position)
            if not greedy and rng.random() < 0.8:  # the sampled token becomes known: its posterior's factors
                log_q, log_r, is_log = torch.randn(rows, 1) - 2, torch.randn(rows, 1) - 2, rng.random() < 0.5
                redraw = log_r if is_log else log_r.exp()
                if rng.random() < 0.5:
                    lazy.record_posterior_factors(position, mass, log_q, redraw, is_log)
                else:  # the fused kernel's form: both factors in one (R, 2) tensor
                    lazy.record_posterior_factors(position, mass, torch.cat([log_q, redraw], 1), None, is_log)
                post = ((log_r - log_q).exp().squeeze(-1) * mass).nan_to_num(0.0).clamp(0.0, 1.0)
                dense.record_posterior(position, post)
            if rng.random() < 0.05:
                idx = torch.randperm(rows)
                lazy.reorder(idx)
                dense.reorder(idx)
            if rng.random() < 0.1:  # reading in between materialises; later records still land
                n = last - prompt + 1
                torch.testing.assert_close(lazy.mass[:, :n], dense.mass[:, :n], rtol=0, atol=1e-7)
        n = last - prompt + 1
        torch.testing.assert_close(lazy.mass[:, :n], dense.mass[:, :n], rtol=0, atol=1e-7)
        torch.testing.assert_close(lazy.posterior[:, :n], dense.posterior[:, :n], rtol=1e-6, atol=1e-7,
                                   equal_nan=True)
        assert torch.isnan(lazy.posterior[:, n:]).all() and (lazy.mass[:, n:] == 0).all()


def test_a_new_row_count_starts_new_tables():
    stats = ReplacementStats()
    stats.reset(2)
    stats.record(2, torch.ones(3), posterior=torch.ones(3))
    stats.record(2, torch.zeros(5))
    assert stats.mass.shape[0] == 5 and torch.isnan(stats.posterior[:, 0]).all()
