"""`DirectionalForCausalLM`: an RL model and its base as one vLLM architecture (runs in vLLM's worker processes).

vLLM builds this module from `(vllm_config, prefix)` like any of its models. It holds two networks, each vLLM's own
implementation of the checkpoint's architecture: the RL model under the prefix `rl` and the base model under `base`.
Attention layers are named by their prefix, so vLLM gives each network its own paged KV cache, and both see exactly
the tokens the scheduler scheduled (chunked prefill, prefix caching, preemption and recomputation included).

- `forward` runs both networks on the scheduled tokens and returns their hidden states side by side,
  `(tokens, H_rl + H_base)`; vLLM selects the rows whose next token is sampled and calls `compute_logits`.
- `compute_logits` returns the RL model's logits (what vLLM's sampler sees) and hands the base logits of the same rows
  to `hf_extrapolate.vllm.logits_processor.DirectionalLogitsProcessor` (same process, same step), which combines the
  two into the step distribution of `hf_extrapolate.directional`.
- `load_weights` loads the RL checkpoint vLLM streams to it, and the base checkpoint (safetensors) from its own path.

What it does not do: pipeline parallelism, prompt embeddings, LoRA requests, speculative decoding (refused by
`hf_extrapolate.vllm.llm.DirectionalLLM`).
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import _shared

logger = logging.getLogger(__name__)

ARCHITECTURE = "HfExtrapolateDirectionalForCausalLM"
CONFIG_KEY = "hf_extrapolate"  # the hf_config attribute carrying {"architecture", "base_model", "config", ...}


def _base_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(
            f"The base model ({path}) has no *.safetensors weights; save it with "
            "`model.save_pretrained(path, safe_serialization=True)`."
        )
    return files


def _safetensors_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


class DirectionalForCausalLM(nn.Module):
    """vLLM model: the RL network (`rl.*`) and the base network (`base.*`) of one architecture, run side by side."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from transformers import AutoConfig
        from vllm.model_executor.models.registry import ModelRegistry
        from vllm.model_executor.models.utils import maybe_prefix

        model_config = vllm_config.model_config
        spec = getattr(model_config.hf_config, CONFIG_KEY, None)
        if not isinstance(spec, dict) or "architecture" not in spec:
            raise ValueError(
                f"{ARCHITECTURE} is built by hf_extrapolate.vllm.DirectionalLLM, which passes the base model through "
                f"`hf_overrides['{CONFIG_KEY}']`; do not select this architecture by hand."
            )
        self.spec = spec
        inner = spec["architecture"]
        model_cls, _ = ModelRegistry.resolve_model_cls([inner], model_config)

        rl_config = copy.copy(model_config.hf_config)
        rl_config.architectures = [inner]
        base_config = AutoConfig.from_pretrained(spec["base_model"], trust_remote_code=model_config.trust_remote_code)
        self.rl = model_cls(vllm_config=_with_hf_config(vllm_config, rl_config), prefix=maybe_prefix(prefix, "rl"))
        self.base = model_cls(vllm_config=_with_hf_config(vllm_config, base_config), prefix=maybe_prefix(prefix, "base"))
        self.rl_hidden = rl_config.get_text_config().hidden_size
        self.base_hidden = base_config.get_text_config().hidden_size

    # ------------------------------------------------------------------ vLLM's model interface
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rl.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None or intermediate_tensors is not None:
            raise NotImplementedError(
                "hf_extrapolate's vLLM model runs the base network on token ids: prompt embeddings and pipeline "
                "parallelism are not supported."
            )
        rl_hidden = self.rl(input_ids, positions, None, None, **kwargs)
        base_hidden = self.base(input_ids, positions, None, None, **kwargs)
        return torch.cat([rl_hidden, base_hidden], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        rl_hidden, base_hidden = hidden_states.split([self.rl_hidden, self.base_hidden], dim=-1)
        rl_logits = self.rl.compute_logits(rl_hidden)
        base_logits = self.base.compute_logits(base_hidden)
        if rl_logits is not None:
            _shared.put_base_logits(base_logits)
        return rl_logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = {f"rl.{name}" for name in self.rl.load_weights(weights)}
        base_weights = _safetensors_weights(_base_files(self.spec["base_model"]))
        loaded |= {f"base.{name}" for name in self.base.load_weights(base_weights)}
        logger.info("Loaded the RL and the base network (%d parameter tensors).", len(loaded))
        return loaded


def _with_hf_config(vllm_config, hf_config):
    """A shallow copy of `vllm_config` whose model config carries `hf_config` (everything else is shared, notably the
    compilation config where attention layers register, so that both networks get KV caches)."""
    model_config = copy.copy(vllm_config.model_config)
    object.__setattr__(model_config, "hf_config", hf_config)
    object.__setattr__(model_config, "hf_text_config", hf_config.get_text_config())
    out = copy.copy(vllm_config)
    object.__setattr__(out, "model_config", model_config)
    return out
