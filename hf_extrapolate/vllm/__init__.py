"""hf_extrapolate on vLLM: exact directional decoding inside vLLM's engine (extra `[vllm]`).

`DirectionalLLM` wraps vLLM's `LLM` with an architecture holding the RL and the base network (each in vLLM's paged
KV cache) and a batch-level logits processor computing the step distribution of `hf_extrapolate.directional` per
request. `hf_extrapolate.vllm.evaluation.VllmEngine` runs the evaluation runner (`hf-extrapolate eval / sweep
--engine vllm`) on one such engine. `DirectionalLLM` needs vLLM (imported when an engine is built).
"""

from .llm import DirectionalLLM
from .model import ARCHITECTURE

__all__ = ["ARCHITECTURE", "DirectionalLLM"]
