"""`DirectionalLogitsProcessor` for vLLM V1: the step distribution of Algorithm 1 / Eq. 7, per request, in the sampler.

vLLM's sampler calls it with the RL logits of every request in the persistent batch; it takes the base logits of the
same rows (left by `hf_extrapolate.vllm.model.DirectionalForCausalLM.compute_logits`) and returns, per row, what
`hf_extrapolate.directional.directional_step_with_replacement` returns: `log q` for sampled requests, and for greedy
ones (`temperature=0`) `log r` or `log p` so that vLLM's argmax is the two-stage greedy choice.

Per-request settings come from `SamplingParams.extra_args["hf_extrapolate"]` (written by `DirectionalLLM`): the
request's `ExtrapolationConfig` (the engine's default with the request's `extra_args["extrapolation_config"]`
overrides), the inner temperature / top-k / top-p, and a key for the statistics. vLLM's own sampler must be neutral
for these requests (temperature 1 or 0, no top-k / top-p / min-p / penalties / logit bias): `validate_params` refuses
anything else at request time. It is not argmax-invariant (it changes greedy choices), so vLLM applies it before its
greedy / random split, after allowed-token and bad-word masks and the min-tokens processor (their `-inf` are honoured:
see `normalize_pair`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as VllmLogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from ..config import ExtrapolationConfig
from ..directional import directional_step_with_replacement
from ..distributions import NEG_INF
from ..fast_step import Workspace, fast_step
from ..processor import shared_vocab_size
from . import _shared

logger = logging.getLogger(__name__)

REQUEST_KEY = "hf_extrapolate"  # extra_args entry written by DirectionalLLM
OVERRIDES_KEY = "extrapolation_config"  # extra_args entry a user may write: per-request config overrides
_EPS = 1e-5


def request_config(default: ExtrapolationConfig, extra_args: dict[str, Any] | None) -> ExtrapolationConfig:
    """The `ExtrapolationConfig` of one request: `default`, the user's overrides, then the inner warpers."""
    extra = extra_args or {}
    overrides = extra.get(OVERRIDES_KEY) or {}
    if isinstance(overrides, ExtrapolationConfig):
        overrides = overrides.to_dict()
    if not isinstance(overrides, dict):
        raise ValueError(
            f"SamplingParams.extra_args['{OVERRIDES_KEY}'] must be a dict of ExtrapolationConfig fields, e.g. "
            f"{{'gamma': 0.5}}; got {type(overrides).__name__}."
        )
    inner = extra.get(REQUEST_KEY, {}).get("sampling", {})
    return default.replace(**{**overrides, **inner})


def check_request_params(params) -> None:
    """Raise `ValueError` for a request the directional step cannot serve exactly (called by DirectionalLLM on
    each request, and by vLLM at request time)."""
    extra = params.extra_args or {}
    if REQUEST_KEY not in extra:
        raise ValueError(
            "This engine decodes with hf_extrapolate's directional step: send requests through "
            "hf_extrapolate.vllm.DirectionalLLM (generate / chat), which moves temperature, top_k and top_p "
            "inside the step and keeps vLLM's sampler neutral."
        )
    request_config(ExtrapolationConfig(), extra)  # validates the user's overrides (names and values)
    neutral = {
        "top_p": (params.top_p, 1.0), "top_k": (params.top_k if params.top_k > 0 else 0, 0),
        "min_p": (params.min_p, 0.0), "presence_penalty": (params.presence_penalty, 0.0),
        "frequency_penalty": (params.frequency_penalty, 0.0),
        "repetition_penalty": (params.repetition_penalty, 1.0),
    }
    for name, (value, want) in neutral.items():
        if value != want:
            raise ValueError(
                f"SamplingParams.{name} (={value}) would act on the directional mixture; hf_extrapolate applies "
                f"temperature / top_k / top_p inside (DirectionalLLM moves them there) and supports no {name}."
            )
    if params.temperature >= _EPS and abs(params.temperature - 1.0) > 1e-9:
        raise ValueError("vLLM's own temperature must be 1.0 (sampling) or 0 (greedy); DirectionalLLM sets it.")
    if params.logit_bias:
        raise ValueError("SamplingParams.logit_bias is not supported by directional decoding (it would bias only "
                         "the RL model); mask tokens with `allowed_token_ids` or `bad_words` instead.")
    if params.prompt_logprobs is not None:
        raise ValueError("SamplingParams.prompt_logprobs are not supported by directional decoding (they would "
                         "be the RL model's); use hf_extrapolate.analysis.token_metrics for prompt scores.")


class DirectionalLogitsProcessor(VllmLogitsProcessor):
    """vLLM V1 batch-level logits processor (see the module docstring). Built by vLLM in each worker."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from .model import CONFIG_KEY

        spec = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None) or {}
        self.default_config = ExtrapolationConfig.from_dict(spec.get("config", {}))
        self.vocab_size = spec.get("vocab_size")
        self.device = device
        # row index in the persistent batch -> (config, greedy, key, output token ids (a live reference))
        self.rows: dict[int, tuple[ExtrapolationConfig, bool, str, list[int]]] = {}
        self._workspace = Workspace()  # fast_step's intermediates, reused from step to step

    # ------------------------------------------------------------------ vLLM's interface
    @classmethod
    def validate_params(cls, params) -> None:
        check_request_params(params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            extra = params.extra_args or {}
            if REQUEST_KEY not in extra:
                self.rows.pop(index, None)
                continue
            config = request_config(self.default_config, extra)
            greedy = params.temperature < _EPS
            self.rows[index] = (config, greedy, extra[REQUEST_KEY]["key"], output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    @torch.no_grad()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        base_logits = _shared.take_base_logits()
        rows = {i: r for i, r in self.rows.items() if i < logits.shape[0]}
        if not rows:
            return logits
        if base_logits is None or base_logits.shape[0] != logits.shape[0]:
            raise RuntimeError(
                f"hf_extrapolate: the base logits of this step ({None if base_logits is None else base_logits.shape}) "
                f"do not match the RL logits ({tuple(logits.shape)}); speculative decoding and prompt log-probs are "
                "not supported with directional decoding."
            )
        shared = shared_vocab_size(logits.shape[-1], base_logits.shape[-1], self.vocab_size)
        groups: dict[tuple[ExtrapolationConfig, bool], list[int]] = {}
        for index, (config, greedy, _key, _out) in rows.items():
            groups.setdefault((config, greedy), []).append(index)
        base_logits = base_logits.to(logits.device)
        whole = len(groups) == 1 and len(rows) == logits.shape[0]  # one setting for every row: no gather / scatter
        if whole and shared == logits.shape[-1]:
            ((config, greedy),) = groups
            scores, mass = self._step(logits, base_logits, config, greedy)
            self._record(rows, sorted(rows), mass)
            return scores.to(logits.dtype)
        out = logits
        if shared < logits.shape[-1]:
            out = logits.clone()
            out[:, shared:] = NEG_INF
        for (config, greedy), indices in groups.items():
            if whole:
                indices, rl, base = sorted(indices), logits[:, :shared], base_logits[:, :shared]
            else:
                idx = torch.tensor(indices, device=logits.device)
                rl, base = logits[idx, :shared], base_logits[idx, :shared]
            scores, mass = self._step(rl, base, config, greedy)
            if whole:
                out[:, :shared] = scores.to(out.dtype)
            else:
                out[idx, :shared] = scores.to(out.dtype)
            self._record(rows, indices, mass)
        return out

    def _step(self, rl: torch.Tensor, base: torch.Tensor, config: ExtrapolationConfig, greedy: bool):
        """(scores, mass): `fast_step` where it covers the configuration (no top-k / top-p: fewer passes, and the
        compiled CPU kernel when `HF_EXTRAPOLATE_CPU_KERNEL=1`), else the definition. Scores are a fresh tensor."""
        step = fast_step(rl, base, config, greedy=greedy, workspace=self._workspace)
        if step is None:
            scores, mass, _ = directional_step_with_replacement(rl, base, config, greedy=greedy)
            return scores, mass
        return step.scores, step.mass

    @staticmethod
    def _record(rows, indices: list[int], mass: torch.Tensor) -> None:
        """The replaced mass of each row `indices[i]` (`mass[i]`) under its request's statistics key."""
        for index, m in zip(indices, mass.tolist()):
            _config, _greedy, key, output_ids = rows[index]
            _shared.record(key, len(output_ids), m)
