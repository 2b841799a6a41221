"""State shared, inside one vLLM worker process, by the model (`model.py`) and the logits processor.

vLLM computes the logits of a step with `model.compute_logits` and passes them straight to the sampler, whose logits
processors see only the RL logits. The model therefore leaves the base logits of the same rows here, and the
processor takes them in the same step (a step is synchronous within a worker: compute_logits, then the sampler).
The per-request replacement statistics are kept here too, until `DirectionalLLM` collects them with a worker RPC.
"""

from __future__ import annotations

import torch

_base_logits: torch.Tensor | None = None
# request key -> {output position: replaced mass M at that position}
_stats: dict[str, dict[int, float]] = {}


def put_base_logits(logits: torch.Tensor) -> None:
    global _base_logits
    _base_logits = logits


def take_base_logits() -> torch.Tensor | None:
    global _base_logits
    logits, _base_logits = _base_logits, None
    return logits


def record(key: str, position: int, mass: float) -> None:
    _stats.setdefault(key, {})[position] = mass


def pop_stats(keys: list[str]) -> dict[str, dict[int, float]]:
    return {key: _stats.pop(key, {}) for key in keys}


class DirectionalWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): lets the engine's client collect the statistics."""

    def hf_extrapolate_pop_stats(self, keys: list[str]) -> dict[str, dict[int, float]]:
        return pop_stats(keys)
