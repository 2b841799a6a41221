"""`ReweightingConfig`: which training-time advantage reweighting to apply, and how strongly.

The config says *what*; `hf_extrapolate.training.reweighting` does the math and
`hf_extrapolate.training.trl_trainer` wires it into TRL's `GRPOTrainer`. It is a plain dataclass validated in
`__post_init__`, like `hf_extrapolate.ExtrapolationConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# "lowprob": the paper's Eq. 8; "ppl": Deng et al. 2025; "dominate": Yang et al. 2025; "none": plain DAPO/GRPO.
REWEIGHTING_METHODS = ("lowprob", "ppl", "dominate", "none")

# The value each method uses when `alpha` is left to None.
# - lowprob: 0.2, the paper's value for Qwen2.5-Math-7B (use 0.1 for Qwen3-8B-Base).
# - dominate: 0.2, the `REWEIGHT_K` (= alpha) of the official AR-Lopti script `scripts/train_kklogic_AR_4x80GB.sh`.
# - ppl: 0.1, our choice: the value of Deng et al. could not be verified (see `reweighting.ppl_weights`).
DEFAULT_ALPHA = {"lowprob": 0.2, "ppl": 0.1, "dominate": 0.2, "none": 0.0}

# The paper's training runs (the reference's `scripts/run_7B.sh`, `scripts/run_8B.sh`): Eq. 8 on DAPO with alpha per
# base model. `model` is the base model trained from (the 7B script uses a copy with a 32k context window).
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-math-7b": {"method": "lowprob", "alpha": 0.2, "model": "Qwen/Qwen2.5-Math-7B"},
    "qwen3-8b-base": {"method": "lowprob", "alpha": 0.1, "model": "Qwen/Qwen3-8B-Base"},
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_alpha(method: str, alpha: float | None) -> float:
    """Validate `method` and `alpha` and return `alpha` as a float (the method's default when `alpha` is None).

    Raises `ValueError` naming the argument, its value, the allowed range and the fix.
    """
    if method not in REWEIGHTING_METHODS:
        raise ValueError(
            f"`method` (={method!r}) must be one of {REWEIGHTING_METHODS}: 'lowprob' is the paper's Eq. 8, 'ppl' "
            "(Deng et al. 2025) and 'dominate' (Yang et al. 2025) are the baselines it compares with, 'none' leaves "
            "the advantages unchanged."
        )
    if alpha is None:
        return DEFAULT_ALPHA[method]
    if not _is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(
            f"`alpha` (={alpha!r}) must be a finite real number >= 0 (0 leaves the advantages unchanged); the paper "
            "uses 0.2 for Qwen2.5-Math-7B and 0.1 for Qwen3-8B-Base with method='lowprob'. Pass None for the "
            f"method's default ({DEFAULT_ALPHA[method]} for {method!r})."
        )
    if method == "dominate" and alpha > 1:
        raise ValueError(
            f"`alpha` (={alpha!r}) must lie in [0, 1] for method='dominate': the weight alpha * p + (1 - alpha) turns "
            "negative for low-probability tokens when alpha > 1 and would flip the sign of their advantage. Yang et "
            "al.'s official script uses alpha=0.2."
        )
    return float(alpha)


@dataclass
class ReweightingConfig:
    """Configuration of the probability-aware advantage reweighting applied inside the DAPO/GRPO loss.

    Example:

    ```python
    >>> from hf_extrapolate.training import ReweightingConfig
    >>> ReweightingConfig(method="lowprob").alpha  # the paper's value for Qwen2.5-Math-7B
    0.2
    >>> ReweightingConfig(method="lowprob", alpha=0.1)  # Qwen3-8B-Base
    ReweightingConfig(method='lowprob', alpha=0.1, low_prob_threshold=0.5)
    ```
    """

    method: str = field(
        default="lowprob",
        metadata={
            "help": "'lowprob' (the paper's Eq. 8: A * (1 + alpha * (1 - p_old))), 'ppl' (Deng et al. 2025: "
            "per-response weight 1 - alpha * z(log PPL) within the group), 'dominate' (Yang et al. 2025: "
            "A * (alpha * p_old + 1 - alpha)) or 'none'."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": "Strength of the reweighting; None picks the method's default (`DEFAULT_ALPHA`). 0 = off."},
    )
    low_prob_threshold: float = field(
        default=0.5,
        metadata={
            "help": "A response token counts as low-probability when p_old < low_prob_threshold; only used for the "
            "logged share `reweight/low_prob_frac` (Yang et al.'s Lopti splits tokens at eta = 0.4 in its script)."
        },
    )

    def __post_init__(self) -> None:
        self.alpha = resolve_alpha(self.method, self.alpha)
        if not _is_real(self.low_prob_threshold) or not 0.0 < self.low_prob_threshold <= 1.0:
            raise ValueError(
                f"`low_prob_threshold` (={self.low_prob_threshold!r}) must be a float in (0, 1]; it only sets which "
                "tokens the logged metric `reweight/low_prob_frac` counts as low-probability (default 0.5)."
            )
        self.low_prob_threshold = float(self.low_prob_threshold)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ReweightingConfig:
        """The paper's reweighting for the base model `name` (see `TRAINING_PRESETS`), with `overrides` applied.

        ```python
        >>> from hf_extrapolate.training import ReweightingConfig
        >>> ReweightingConfig.preset("qwen3-8b-base").alpha
        0.1
        ```
        """
        if name not in TRAINING_PRESETS:
            raise ValueError(f"`name` (={name!r}) is not a training preset; the presets are {sorted(TRAINING_PRESETS)}.")
        values = {k: v for k, v in TRAINING_PRESETS[name].items() if k != "model"}
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReweightingConfig:
        if not isinstance(data, dict):
            raise TypeError(f"`data` must be a dict of config fields, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TypeError(f"ReweightingConfig.from_dict: unknown field(s) {unknown}; it has {sorted(names)}.")
        return cls(**data)
