"""`ExtrapolationConfig`: what the directional step distribution is (proposal, criterion, threshold, gamma, warpers).

The config says *what*; `hf_extrapolate.directional` does the math and `hf_extrapolate.processor` wires it into
`generate()`. It is a frozen dataclass validated in `__post_init__` (fields cannot be changed after validation: use `replace()`), with a JSON round-trip (`to_dict` / `from_dict`,
`to_json_file` / `from_json_file`) in the style of PEFT's `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

PROPOSALS = ("base", "rl")
# token-level: `logp_diff` is always log pi_RL - log pi_base (Eq. 1); the role-relative pair compares the proposal
# with the other model (the reference code's `logp` / `neg_logp`; with proposal="base" `logp_other_minus_proposal`
# is `logp_diff`)
TOKEN_CRITERIA = ("logp_diff", "logp_other_minus_proposal", "logp_proposal_minus_other")
POSITION_CRITERIA = ("entropy", "rl_entropy", "kl", "reverse_kl", "avg_kl")
OTHER_CRITERIA = ("random", "always", "never")
CRITERIA = TOKEN_CRITERIA + POSITION_CRITERIA + OTHER_CRITERIA

CONFIG_NAME = "extrapolation_config.json"

# bounds that keep every score of the step finite in float32 (log-probs >= log(float32 tiny) ~ -87.3)
MAX_GAMMA = 1e3
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
# The released settings of the paper's `scripts/run_extrapolate.sh` (the extrapolation runs; the script's
# "replace only" runs are the same with gamma=0). Every one has the base model proposing (`--model` = base) with the
# `neg_logp` gate, which is `logp_diff` when the base proposes, and the reference's top-50 view of each engine.
_RELEASED = dict(proposal="base", criterion="logp_diff", temperature=1.0, top_k=0, top_p=0.7, view_top_k=50)
PRESETS: dict[str, dict[str, Any]] = {
    "dapo-32b": dict(_RELEASED, threshold=-0.3, gamma=0.05, base_model="Qwen/Qwen2.5-32B",
                     rl_model="BytedTsinghua-SIA/DAPO-Qwen-32B"),
    "orz-32b": dict(_RELEASED, threshold=-0.4, gamma=0.1, base_model="Qwen/Qwen2.5-32B",
                    rl_model="Open-Reasoner-Zero/Open-Reasoner-Zero-32B"),
    "unireason-14b": dict(_RELEASED, threshold=-0.35, gamma=0.1, base_model="Qwen/Qwen3-14B-Base",
                          rl_model="ReasoningTransferability/UniReason-Qwen3-14B-RL"),
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ExtrapolationConfig:
    """Configuration of selective token replacement and test-time extrapolation (the paper's Algorithm 1 and Eq. 7).

    At every step a token is drawn from the *proposal* distribution `p`; if the *criterion* fires it is redrawn from
    the *replacement* distribution `r = warp((1 + gamma) * logp_rl - gamma * logp_base)`. `gamma = 0` is plain
    replacement by the RL model; `gamma > 0` extrapolates along the RLVR direction (the paper uses 0.05-0.1).

    Example:

    ```python
    >>> from hf_extrapolate import ExtrapolationConfig
    >>> cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1, top_p=0.7)
    >>> ExtrapolationConfig.from_dict(cfg.to_dict()) == cfg
    True
    ```
    """

    proposal: str = field(
        default="base",
        metadata={"help": "Model the token is first drawn from: 'base' (Algorithm 1) or 'rl' (the paper's Table 1)."},
    )
    criterion: str = field(
        default="logp_diff",
        metadata={
            "help": "When to redraw: 'logp_diff' (token-level, fires when logp_rl(y) - logp_base(y) < threshold); "
            "'logp_other_minus_proposal' / 'logp_proposal_minus_other' (token-level, role-relative: fire when "
            "logp_other(y) - logp_proposal(y) < threshold, resp. logp_proposal(y) - logp_other(y) < threshold); "
            "'entropy', 'rl_entropy', 'kl', 'reverse_kl', 'avg_kl' (position-level, fire when the metric > "
            "threshold); 'random' (fires with probability threshold); 'always'; 'never'."
        },
    )
    threshold: float = field(
        default=-0.3,
        metadata={"help": "tau of the criterion. The paper: -0.3 (DAPO-32B), -0.4 (ORZ-32B), -0.35 (UniReason-14B)."},
    )
    gamma: float = field(
        default=0.0,
        metadata={"help": "Extrapolation strength of Eq. 7: r ∝ pi_rl^(1+gamma) / pi_base^gamma. 0 = replace only."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Temperature applied to p and r (inside)."})
    top_k: int = field(default=0, metadata={"help": "Top-k applied to p and r (inside); 0 disables it."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p applied to p and r (inside); 1.0 disables it."})
    candidate_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Restrict r to the proposal's top-k raw tokens before warping (the paper's reference code sees "
            "only the top-50); None uses the full vocabulary. Not the reference's step: see `view_top_k`."
        },
    )
    view_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Compute the step from what an engine returning only the top-k log-probs (plus the drawn token) "
            "shows, as the paper's reference code does with k=50: the other model's log-prob outside its top-k is "
            "the smallest of its top-k (gate and redraw), the redraw's candidates are the proposal's top-k plus the "
            "drawn token, entropy / KL use the renormalised top-k views. None (default) uses the full vocabulary."
        },
    )

    def __post_init__(self) -> None:
        if self.proposal not in PROPOSALS:
            raise ValueError(
                f"`proposal` (={self.proposal!r}) must be one of {PROPOSALS}: 'base' draws from the base model and "
                "replaces with the RL model (Algorithm 1), 'rl' draws from the RL model and extrapolates on it."
            )
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"`criterion` (={self.criterion!r}) must be one of {CRITERIA}. Use 'logp_diff' for the paper's "
                "direction criterion."
            )
        if not _is_real(self.threshold) or math.isnan(self.threshold):
            raise ValueError(f"`threshold` (={self.threshold!r}) must be a real number, e.g. -0.3 for 'logp_diff'.")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.criterion == "random" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"`threshold` (={self.threshold}) is the replacement probability of criterion='random' and must lie "
                "in [0, 1]; e.g. threshold=0.1 replaces 10% of the tokens."
            )
        if not _is_real(self.gamma) or not math.isfinite(self.gamma) or abs(self.gamma) > MAX_GAMMA:
            raise ValueError(
                f"`gamma` (={self.gamma!r}) must be a real number in [-{MAX_GAMMA:g}, {MAX_GAMMA:g}]; the paper uses "
                "0.05-0.1 (larger values overflow float32 on tokens either model nearly excludes)."
            )
        object.__setattr__(self, "gamma", float(self.gamma))
        if not _is_real(self.temperature) or not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"`temperature` (={self.temperature!r}) has to be a float in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
                "(outside it float32 scores overflow). If you're looking for greedy decoding, call generate with "
                "`do_sample=False`."
            )
        object.__setattr__(self, "temperature", float(self.temperature))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` (={self.top_k!r}) has to be a non-negative integer; 0 disables top-k.")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` (={self.top_p!r}) has to be a float in (0, 1]; 1.0 disables top-p.")
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.candidate_top_k is not None and (
            isinstance(self.candidate_top_k, bool) or not isinstance(self.candidate_top_k, int) or self.candidate_top_k < 1
        ):
            raise ValueError(
                f"`candidate_top_k` (={self.candidate_top_k!r}) has to be a positive integer (the paper's reference "
                "code uses 50) or None for the full vocabulary."
            )

        if self.view_top_k is not None:
            if isinstance(self.view_top_k, bool) or not isinstance(self.view_top_k, int) or self.view_top_k < 1:
                raise ValueError(
                    f"`view_top_k` (={self.view_top_k!r}) has to be a positive integer (the paper's reference code "
                    "sees the top-50: view_top_k=50) or None for the exact full-vocabulary step."
                )
            if self.candidate_top_k is not None:
                raise ValueError(
                    f"`candidate_top_k` (={self.candidate_top_k}) cannot be combined with `view_top_k` "
                    f"(={self.view_top_k}): the view already restricts the redraw to the proposal's top-k plus the "
                    "drawn token. Set candidate_top_k=None."
                )
            if self.top_k != 0:
                raise ValueError(
                    f"`top_k` (={self.top_k}) must be 0 with `view_top_k` (={self.view_top_k}): the reference code "
                    "it reproduces has no top-k warper. Set top_k=0, or view_top_k=None for the exact step."
                )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ExtrapolationConfig:
        """The released setting `name` of the paper (see `PRESETS`), with `overrides` applied.

        The presets reproduce the reference code's step (`view_top_k=50`, base proposing, `logp_diff` gate,
        temperature 1.0, top-p 0.7); `preset(name, view_top_k=None)` is the same setting on the exact step.

        ```python
        >>> from hf_extrapolate import ExtrapolationConfig
        >>> ExtrapolationConfig.preset("dapo-32b").threshold
        -0.3
        ```
        """
        if name not in PRESETS:
            raise ValueError(f"`name` (={name!r}) is not a preset; the presets are {sorted(PRESETS)}.")
        values = {k: v for k, v in PRESETS[name].items() if k not in ("base_model", "rl_model")}
        _check_keys(overrides, "ExtrapolationConfig.preset")
        return cls(**{**values, **overrides})

    # ------------------------------------------------------------------ helpers
    @property
    def is_token_level(self) -> bool:
        """Whether the criterion is decided per token (`logp_diff`) rather than per position."""
        return self.criterion in TOKEN_CRITERIA

    def replace(self, **overrides: Any) -> ExtrapolationConfig:
        """A copy with `overrides` applied (validated); unknown names raise a `TypeError` that lists the fields."""
        _check_keys(overrides, "ExtrapolationConfig.replace")
        return dataclasses.replace(self, **overrides)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtrapolationConfig:
        if not isinstance(data, dict):
            raise TypeError(f"`data` must be a dict of config fields, got {type(data).__name__}.")
        _check_keys(data, "ExtrapolationConfig.from_dict")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ExtrapolationConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _check_keys(data: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(ExtrapolationConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TypeError(f"{where}: unknown field(s) {unknown}; ExtrapolationConfig has {sorted(names)}.")
