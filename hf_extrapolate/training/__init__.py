"""Training-time advantage reweighting (the paper's Eq. 8) and its two baselines, with a TRL integration.

- `reweight_advantages(advantages, old_logprobs, mask, method="lowprob", alpha=0.2)` and the per-method weight
  functions are pure tensor math; they need only torch.
- `DirectionalGRPOTrainer` subclasses TRL's `GRPOTrainer`. TRL is optional (`pip install hf_extrapolate[train]`):
  it is imported only when `DirectionalGRPOTrainer` is first accessed, so `import hf_extrapolate.training` works
  without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DEFAULT_ALPHA, REWEIGHTING_METHODS, TRAINING_PRESETS, ReweightingConfig
from .reweighting import (
    dominate_weights,
    lowprob_weights,
    ppl_sequence_weights,
    ppl_weights,
    reweight_advantages,
    sequence_log_perplexity,
    token_weights,
)

if TYPE_CHECKING:
    from .trl_trainer import DirectionalGRPOTrainer

__all__ = [
    "DEFAULT_ALPHA",
    "REWEIGHTING_METHODS",
    "TRAINING_PRESETS",
    "DirectionalGRPOTrainer",
    "ReweightingConfig",
    "dominate_weights",
    "lowprob_weights",
    "ppl_sequence_weights",
    "ppl_weights",
    "reweight_advantages",
    "sequence_log_perplexity",
    "token_weights",
]


def __getattr__(name: str) -> Any:
    if name == "DirectionalGRPOTrainer":
        from .trl_trainer import DirectionalGRPOTrainer

        return DirectionalGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
