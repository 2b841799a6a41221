"""The paper's released settings as presets: values from the reference's scripts, validated, overridable."""

from __future__ import annotations

import pytest

from hf_extrapolate import PRESETS, ExtrapolationConfig
from hf_extrapolate.training import TRAINING_PRESETS, ReweightingConfig

# from scripts/run_extrapolate.sh: --criteria neg_logp --threshold T --weights -G 1+G, base as --model, top-p 0.7
RELEASED = {"dapo-32b": (-0.3, 0.05), "orz-32b": (-0.4, 0.1), "unireason-14b": (-0.35, 0.1)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_are_the_released_settings(name):
    cfg = ExtrapolationConfig.preset(name)
    threshold, gamma = RELEASED[name]
    assert (cfg.threshold, cfg.gamma) == (threshold, gamma)
    assert (cfg.proposal, cfg.criterion, cfg.temperature, cfg.top_p, cfg.top_k) == ("base", "logp_diff", 1.0, 0.7, 0)
    assert cfg.view_top_k == 50 and cfg.candidate_top_k is None
    # with the base proposing, the reference's role-relative `neg_logp` gate is `logp_diff`
    assert cfg.replace(criterion="logp_other_minus_proposal").proposal == "base"
    assert {"base_model", "rl_model"} <= set(PRESETS[name])


def test_preset_overrides_and_errors():
    exact = ExtrapolationConfig.preset("orz-32b", view_top_k=None, gamma=0.0)
    assert exact.view_top_k is None and exact.gamma == 0.0 and exact.threshold == -0.4
    with pytest.raises(ValueError, match="dapo-32b"):
        ExtrapolationConfig.preset("dapo")
    with pytest.raises(TypeError, match="gama"):
        ExtrapolationConfig.preset("dapo-32b", gama=0.1)


def test_training_presets():
    assert ReweightingConfig.preset("qwen2.5-math-7b") == ReweightingConfig(method="lowprob", alpha=0.2)
    assert ReweightingConfig.preset("qwen3-8b-base") == ReweightingConfig(method="lowprob", alpha=0.1)
    assert ReweightingConfig.preset("qwen3-8b-base", alpha=0.3).alpha == 0.3
    assert set(TRAINING_PRESETS) == {"qwen2.5-math-7b", "qwen3-8b-base"}
    with pytest.raises(ValueError, match="qwen3-8b-base"):
        ReweightingConfig.preset("qwen3-8b")
