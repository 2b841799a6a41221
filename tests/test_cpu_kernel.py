"""The fused CPU step (`hf_extrapolate.cpu_kernel`) against the definition and against the eager `fast_step`."""

import itertools
import math
import shutil

import pytest
import torch

from hf_extrapolate import ExtrapolationConfig, cpu_kernel
from hf_extrapolate.directional import directional_step_with_replacement
from hf_extrapolate.distributions import LOG_TINY
from hf_extrapolate.fast_step import SAFE_PROBABILITY, fast_step

from .test_fast_step import CONFIGS, assert_same, pair

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)


@pytest.fixture(scope="module")
def kernel():
    cpu_kernel.enable()  # a build failure fails the tests (CI has a compiler)
    yield cpu_kernel.active()
    cpu_kernel.disable()


def fused(rl, base, cfg, greedy, seed=7):
    return fast_step(rl, base, cfg, greedy=greedy, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_kernel_equals_definition(kernel, kw, greedy):
    cfg = ExtrapolationConfig(**kw)
    # vocab 97 (a scalar tail after the vector loop) and 160 (whole vectors), masked tokens, close and far models
    for seed, mask, close, vocab in ((0, True, False, 97), (1, False, True, 160), (2, True, True, 161)):
        rl, base = pair(seed=seed, mask=mask, close=close, vocab=vocab)
        rl_before, base_before = rl.clone(), base.clone()
        step = fused(rl, base, cfg, greedy)
        assert step.scores.data_ptr() not in (rl.data_ptr(), base.data_ptr())
        assert_same(step, rl, base, cfg, greedy, generator_seed=7)
        torch.testing.assert_close(rl, rl_before, rtol=0, atol=0)  # inputs are never modified
        torch.testing.assert_close(base, base_before, rtol=0, atol=0)


def test_kernel_is_the_path_taken(kernel, monkeypatch):
    """With the kernel on, fast_step goes through it (a broken kernel is seen), and off, it does not."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    rl, base = pair(seed=5)
    calls = []

    class Spy:
        def sample_step(self, *args):
            calls.append("sample")
            return kernel.sample_step(*args)

        def greedy_step(self, *args):
            calls.append("greedy")
            return kernel.greedy_step(*args)

    monkeypatch.setattr(cpu_kernel, "_module", Spy())
    fast_step(rl, base, cfg)
    fast_step(rl, base, cfg, greedy=True)
    fast_step(rl, base, cfg, branch_free=True)  # the accelerator form never takes it
    fast_step(rl.double(), base.double(), cfg)  # float64 is computed in float32 by fast_step: taken
    assert calls == ["sample", "greedy", "sample"]


@pytest.mark.parametrize("greedy", [False, True])
def test_kernel_deep_tail_is_exact(kernel, greedy):
    """Logits over hundreds of nats: q underflows in probability space, and vectors holding such q are redone in
    log space."""
    for T in (1.0, 0.3):
        for gamma in (0.0, 0.5):
            cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=gamma, temperature=T)
            rl, base = pair(scale=60.0, seed=3, vocab=200)
            scores, _, _ = directional_step_with_replacement(rl, base, cfg, greedy=greedy)
            assert float(scores[torch.isfinite(scores)].min()) < -200
            assert_same(fused(rl, base, cfg, greedy), rl, base, cfg, greedy)


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000])
def test_kernel_shapes(kernel, rows, vocab):
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.2, proposal="base", temperature=0.8)
    for greedy in (False, True):
        rl, base = pair(rows=rows, vocab=vocab, mask=False, seed=rows + vocab)
        assert_same(fused(rl, base, cfg, greedy), rl, base, cfg, greedy)


def test_kernel_matches_eager_on_a_real_sized_row(kernel):
    """(4, 32000) with LLM-like logits: the fused step and eager fast_step agree (tight) and so do their tokens'
    greedy choices."""
    g = torch.Generator().manual_seed(0)
    rl = torch.randn(4, 32000, generator=g) * 3
    base = rl + torch.randn(4, 32000, generator=g)
    for cfg in (ExtrapolationConfig(threshold=-0.3, gamma=0.1),
                ExtrapolationConfig(criterion="logp_diff", threshold=-0.5, gamma=0.0, proposal="base"),
                ExtrapolationConfig(criterion="random", threshold=0.2, gamma=0.3, temperature=0.6)):
        for greedy in (False, True):
            on = fused(rl, base, cfg, greedy)
            cpu_kernel.disable()
            try:
                off = fused(rl, base, cfg, greedy)
            finally:
                cpu_kernel.enable()
            torch.testing.assert_close(on.scores, off.scores, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(on.mass, off.mass, rtol=1e-6, atol=1e-6)
            if greedy:
                assert torch.equal(on.scores.argmax(-1), off.scores.argmax(-1))


def test_kernel_comparison_can_fail(kernel):
    """Negative controls: the check used above rejects the fused step of a nearby threshold, gamma or proposal."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    rl, base = pair(seed=4)
    other = "rl" if cfg.proposal == "base" else "base"
    for wrong in (dict(threshold=-0.25), dict(gamma=0.12), dict(proposal=other), dict(temperature=0.99)):
        for greedy in (False, True):
            if greedy and ("temperature" in wrong or "threshold" in wrong):
                continue  # the argmax does not depend on the temperature; a small shift flips no row's criterion
            with pytest.raises(AssertionError):
                assert_same(fused(rl, base, cfg.replace(**wrong), greedy), rl, base, cfg, greedy)


def test_kernel_flags_non_finite_inputs(kernel):
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    for bad in (float("nan"), float("inf")):
        for which in ("rl", "base"):
            rl, base = pair(seed=6, mask=False)
            (rl if which == "rl" else base)[2, 5] = bad
            for greedy in (False, True):
                step = fused(rl, base, cfg, greedy)
                finite = step.finite
                assert finite is not True
                assert not bool(torch.isfinite(finite[2])), (bad, which, greedy)
                assert bool(torch.isfinite(finite[[0, 1, 3, 4]]).all())
    rl, base = pair(seed=6, mask=False)
    base[0] = float("-inf")  # the base excludes every token
    for greedy in (False, True):
        assert not bool(torch.isfinite(fused(rl, base, cfg, greedy).finite[0]))


def test_kernel_finite_flag_agrees_with_its_check_values(kernel):
    """The kernel's own finiteness flag (read instead of a torch reduction on the hot path) is True exactly when
    every row's check value is finite: clean steps report True, a single bad entry in any row reports the tensor."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    args = (cfg.temperature, cfg.gamma, cfg.threshold, True, False, False, LOG_TINY)
    for greedy in (False, True):
        rl, base = pair(seed=11)
        assert fused(rl, base, cfg, greedy).finite is True
        for row, column, which, bad in itertools.product(range(rl.shape[0]), (7, rl.shape[1] - 1), ("rl", "base"),
                                                         (float("nan"), float("inf"))):  # a vector lane, the tail
            x, y = rl.clone(), base.clone()
            (x if which == "rl" else y)[row, column] = bad
            if greedy:
                _, _, check, flag = kernel.greedy_step(x, y, torch.empty(0), *args)
            else:
                _, _, check, flag = kernel.sample_step(x, y, torch.empty_like(rl), *args, SAFE_PROBABILITY)
            assert flag is False and not bool(torch.isfinite(check[row])), (row, column, which, bad)
            assert bool(torch.isfinite(check[[r for r in range(rl.shape[0]) if r != row]]).all())
            assert fused(x, y, cfg, greedy).finite is not True


def test_chosen_factors_equal_two_gathers(kernel):
    """The posterior's factors read in one call equal log q and r gathered at each row's token (a token beyond the
    last column, from a padded vocabulary tail, reads the last column); bad inputs are refused."""
    gen = torch.Generator().manual_seed(12)
    log_q, redraw = torch.randn(5, 37, generator=gen), torch.rand(5, 37, generator=gen)
    tokens = torch.randint(0, 37, (5, 9), generator=gen)
    tokens[3, 6] = 40  # a padded-tail token
    for position in (0, 6, 8):
        chosen = tokens[:, position : position + 1].clamp(max=36)
        expected = torch.cat([log_q.gather(-1, chosen), redraw.gather(-1, chosen)], 1)
        torch.testing.assert_close(kernel.chosen_factors(log_q, redraw, tokens, position), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        kernel.chosen_factors(log_q, redraw, tokens, 9)  # no such column
    with pytest.raises(RuntimeError):
        kernel.chosen_factors(log_q, redraw, tokens.int(), 0)
    tokens[1, 2] = -1
    with pytest.raises(RuntimeError, match="negative"):
        kernel.chosen_factors(log_q, redraw, tokens, 2)


def test_kernel_refuses_what_it_cannot_compute(kernel):
    rl, base = pair()
    with pytest.raises(RuntimeError, match="float32"):
        kernel.sample_step(rl.double(), base.double(), torch.empty_like(rl), 1.0, 0.0, -0.3, True, False, False,
                           -87.0, 1e-30)
    with pytest.raises(RuntimeError, match="contiguous"):
        strided = torch.randn(rl.shape[1], rl.shape[0]).t()  # (B, V), not contiguous
        kernel.greedy_step(strided, base, torch.empty(0), 1.0, 0.0, -0.3, True, False, False, -87.0)


# ------------------------------------------------------------------ generate, end to end through the kernel
@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("cfg", [
    ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.1),
    ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.0, proposal="base", temperature=0.7),
    ExtrapolationConfig(criterion="random", threshold=0.4, gamma=0.2, proposal="rl"),
], ids=["gamma", "base-proposal-T", "random"])
def test_generate_through_the_kernel_matches_full_recompute(kernel, monkeypatch, cfg, do_sample):
    """Left-padded batch, the base cache kept by the processor, every step's scores against the full recompute."""
    if cfg.criterion == "random" and not do_sample:
        pytest.skip("the greedy random draw is not reproducible by the after-the-fact check (covered above, seeded)")
    from .test_processor_generate import run_and_check
    from .tiny import left_padded_batch, tiny_llama

    calls = []
    real = kernel

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(cpu_kernel, "_module", Spy())
    rl, base = tiny_llama(0), tiny_llama(1)
    torch.manual_seed(0)
    run_and_check(rl, base, left_padded_batch([4, 9, 1]), cfg, dict(do_sample=do_sample, max_new_tokens=12))
    # sampling also reads each drawn token's posterior factors through the kernel
    assert calls and set(calls) == ({"sample_step", "chosen_factors"} if do_sample else {"greedy_step"})


@pytest.mark.parametrize("cfg", [
    ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.1),
    ExtrapolationConfig(criterion="logp_diff", threshold=-0.1, gamma=0.3, temperature=0.05),  # log-space repair
], ids=["fast", "log-space"])
def test_sampled_posterior_through_the_kernel(kernel, cfg):
    """The replaced-token posterior M r(y) / q(y) from the kernel's probability-space r, against float64."""
    from .test_processor_generate import test_sampled_posterior_equals_an_independent_computation as check

    check(cfg)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("gamma", [-0.99999999, 1e-8])
def test_gamma_at_the_edges_of_float32(kernel, greedy, gamma):
    """1 + gamma formed in double: just above -1 it is not 0 in float32 (no NaN at masked tokens), and a gamma
    whose 1 + gamma rounds to 1 keeps masked tokens at -inf (kernel and eager)."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=5.0, gamma=gamma)  # fires everywhere: the redraw
    rl, base = pair(seed=8)
    step = fused(rl, base, cfg, greedy)
    assert not torch.isnan(step.scores).any()
    assert_same(step, rl, base, cfg, greedy)
    cpu_kernel.disable()
    try:
        eager = fused(rl, base, cfg, greedy)
    finally:
        cpu_kernel.enable()
    assert not torch.isnan(eager.scores).any()
    assert_same(eager, rl, base, cfg, greedy)


def test_broken_base_logit_under_an_rl_mask_is_flagged(kernel):
    """A NaN / +inf base logit where the RL scores are -inf poisons the row as in the eager step (flagged), instead
    of being hidden by the mask."""
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
    for bad in (float("nan"), float("inf")):
        rl, base = pair(seed=9)  # rl[:, 3] is -inf
        base[2, 3] = bad
        for greedy in (False, True):
            finite = fused(rl, base, cfg, greedy).finite
            assert not bool(torch.isfinite(finite[2])) and bool(torch.isfinite(finite[[0, 1, 3, 4]]).all())


def test_threshold_beyond_float32(kernel):
    rl, base = pair(seed=10)
    for tau in (1e39, -1e39):
        cfg = ExtrapolationConfig(criterion="logp_diff", threshold=tau, gamma=0.1)
        for greedy in (False, True):
            step = fused(rl, base, cfg, greedy)
            assert_same(step, rl, base, cfg, greedy)


def test_inlined_exp_and_log_within_one_ulp_everywhere(kernel):
    """The hot passes' exp / log (inlined under AVX-512) against float64, over every exponent range, denormal results
    and inputs, and the special values; a wrong polynomial coefficient or range reduction fails by many ulps."""
    module = kernel
    x = torch.cat([torch.linspace(-110.0, 90.0, 1 << 20), torch.randn(1 << 16) * 5,
                   torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 88.72, -103.9])])
    got, ref = module.map_unary(x, False), torch.exp(x.double())
    normal = (ref > torch.finfo(torch.float32).tiny) & (ref < torch.finfo(torch.float32).max)
    ulps = (got[normal].view(torch.int32).long() - ref[normal].float().view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1
    denormal = ref <= torch.finfo(torch.float32).tiny
    assert float((got[denormal].double() - ref[denormal]).abs().max()) <= 1.5e-45
    assert torch.isinf(got[(ref > 3.5e38) & torch.isfinite(x)]).all()
    assert got[-7].item() == math.inf and got[-6].item() == 0.0 and math.isnan(got[-5].item())
    assert got[-4].item() == 1.0 and got[-3].item() == 1.0

    y = torch.cat([torch.exp(torch.linspace(-103.0, 88.7, 1 << 20)), torch.rand(1 << 16),
                   torch.tensor([math.inf, math.nan, 0.0, -1.0, 1.0, 1e-45, 3e-39])])
    got, ref = module.map_unary(y, True), torch.log(y.double())
    finite = torch.isfinite(ref)
    ulps = (got[finite].view(torch.int32).long() - ref[finite].float().view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1
    assert float((got[finite].double() - ref[finite]).abs().max()) < 1e-5
    assert got[-7].item() == math.inf and math.isnan(got[-6].item()) and got[-5].item() == -math.inf
    assert math.isnan(got[-4].item()) and got[-3].item() == 0.0


@pytest.mark.parametrize("vocab", [64, 70])  # without / with a scalar tail
def test_greedy_argmax_takes_the_first_of_tied_maxima(kernel, vocab):
    """The fused argmax (per lane, merged) picks the first index among tied maxima, as torch's argmax: the criterion
    is set to fire at the later tied token only, so picking it would replace the row."""
    base = torch.zeros(2, vocab)
    base[:, [5, 37, vocab - 1]] = 3.0  # tied maxima in two lanes and the tail
    rl = torch.zeros(2, vocab)
    rl[:, 5] = 6.0
    rl[:, 37] = -5.0
    rl[:, vocab - 1] = -5.0
    cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-1.0, gamma=0.5)
    step = fused(rl, base, cfg, greedy=True)
    _, mass, _ = directional_step_with_replacement(rl, base, cfg, greedy=True)
    torch.testing.assert_close(step.mass, mass.float())
    assert float(step.mass.sum()) == 0.0
