"""What is evaluated: the base model, the RL model, or directional decoding with an `ExtrapolationConfig`.

- `base`: plain `base_model.generate`;
- `rl`: plain `rl_model.generate`;
- `directional`: `rl_model.generate` with `DirectionalLogitsProcessor(base_model, config)` — selective replacement
  (`gamma = 0`, proposal "base") or extrapolation (`gamma > 0`).

The sampling knobs (temperature, top-p, top-k) are not part of a mode: the runner applies the same ones to every mode
(inside the processor for `directional`), so that modes differ only in what they are meant to compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ExtrapolationConfig

KINDS = ("base", "rl", "directional")


@dataclass
class EvalMode:
    """One decoding mode of an evaluation run.

    Args:
        name (`str`): how records and tables call it (unique within a run).
        kind (`str`): one of `KINDS`.
        config (`ExtrapolationConfig`, *optional*): required for `kind="directional"`, unused otherwise. Its
            temperature / top-k / top-p are replaced by the run's sampling settings.
    """

    name: str
    kind: str
    config: ExtrapolationConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind` (={self.kind!r}) must be one of {KINDS}.")
        if self.kind == "directional" and not isinstance(self.config, ExtrapolationConfig):
            raise ValueError(
                f"Mode {self.name!r} has kind='directional' and needs an `ExtrapolationConfig` as `config`, got "
                f"{self.config!r}; use EvalMode.replace(...) or EvalMode.extrapolate(...)."
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` (={self.name!r}) must be a non-empty string.")

    @classmethod
    def base(cls) -> EvalMode:
        return cls("base", "base")

    @classmethod
    def rl(cls) -> EvalMode:
        return cls("rl", "rl")

    @classmethod
    def replace(cls, criterion: str = "logp_diff", threshold: float = -0.3, **config: Any) -> EvalMode:
        """Selective replacement (Algorithm 1): draw from the base model, redraw from the RL model where it fires."""
        cfg = ExtrapolationConfig(proposal="base", criterion=criterion, threshold=threshold, gamma=0.0, **config)
        return cls(f"replace:{criterion}@{cfg.threshold:g}", "directional", cfg)

    @classmethod
    def extrapolate(
        cls, criterion: str = "logp_diff", threshold: float = -0.3, gamma: float = 0.1, proposal: str = "base", **config
    ) -> EvalMode:
        """Selective extrapolation (Eq. 7): redraw from `pi_rl^(1+gamma) / pi_base^gamma` where the criterion fires."""
        cfg = ExtrapolationConfig(proposal=proposal, criterion=criterion, threshold=threshold, gamma=gamma, **config)
        if cfg.gamma <= 0:
            raise ValueError(
                f"`gamma` (={gamma}) must be > 0 for an extrapolation mode (the paper uses 0.05-0.1); gamma=0 is "
                "EvalMode.replace(...)."
            )
        return cls(f"extrapolate:{criterion}@{cfg.threshold:g},gamma={cfg.gamma:g},proposal={proposal}", "directional", cfg)

    def fields(self) -> dict[str, Any]:
        """The mode's columns in a result record: `mode`, `kind`, `criterion`, `threshold`, `gamma`, `proposal`."""
        cfg = self.config if self.kind == "directional" else None
        return {
            "mode": self.name,
            "kind": self.kind,
            "criterion": cfg.criterion if cfg else None,
            "threshold": cfg.threshold if cfg else None,
            "gamma": cfg.gamma if cfg else None,
            "proposal": cfg.proposal if cfg else None,
        }
