"""`DirectionalLLM`: vLLM's `LLM` generating with selective replacement / extrapolation against a base model.

```python
from vllm import SamplingParams
from hf_extrapolate import ExtrapolationConfig
from hf_extrapolate.vllm import DirectionalLLM

llm = DirectionalLLM("path/rl", base_model="path/base",
                     extrapolation_config=ExtrapolationConfig(threshold=-0.3, gamma=0.1), dtype="bfloat16")
outs = llm.generate(prompts, SamplingParams(temperature=1.0, top_p=0.7, max_tokens=2048, n=4, logprobs=5))
outs[0].outputs[0].replace_ratio
```

The engine is vLLM's own (`self.llm`, an `LLM`) with the architecture `DirectionalForCausalLM` (both networks in
vLLM's paged KV cache, one forward of each per step) and the batch-level `DirectionalLogitsProcessor` (the step
distribution per request). `generate` / `chat` rewrite each request's `SamplingParams` (on a copy): temperature,
top-k and top-p move inside the step (they warp each component, as in the transformers path) and vLLM's sampler is
made neutral (temperature 1, or 0 for greedy: the two-stage greedy choice); `n > 1` is expanded into `n` requests with
seeds `seed + i` (vLLM's own rule) so that each completion has its statistics, and regrouped. Returned log-probs are
those of the distribution each token was drawn from (`logprobs_mode="processed_logprobs"`): log q when sampling.

What it does not do: data parallelism inside one engine (vLLM's offline `LLM` has none either: one DirectionalLLM per
device on a shard of the prompts), speculative decoding, pipeline parallelism, LoRA requests, prompt embeddings,
prompt log-probs, penalties, min-p and logit bias are refused with an error; the V2 model runner is switched off
(`VLLM_USE_V2_MODEL_RUNNER=0`: its sampler has another logits-processor interface).
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from typing import Any

from ..config import ExtrapolationConfig
from ..processor import shared_vocab_size

logger = logging.getLogger(__name__)

LOGITS_PROCESSOR = "hf_extrapolate.vllm.logits_processor:DirectionalLogitsProcessor"
WORKER_EXTENSION = "hf_extrapolate.vllm._shared.DirectionalWorkerExtension"
REFUSED_KWARGS = {
    "speculative_config": "speculative decoding would skip the base model's step",
    "enable_lora": "a LoRA request would change only the RL network; merge the adapter and pass the merged model",
    "enable_prompt_embeds": "the base network runs on token ids",
    "logits_processors": "other batch-level processors would act on the directional mixture",
    "worker_extension_cls": "DirectionalLLM sets its own worker extension",
}
ADAPTER_CONFIG = "adapter_config.json"


def _refuse_adapter(path: Any, role: str) -> None:
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise ValueError(
            f"`{role}` ({path}) is a PEFT LoRA adapter; vLLM's directional engine needs full checkpoints. Merge it: "
            "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()"
            ".save_pretrained(merged_dir)` and pass `merged_dir` (or use the transformers path, "
            "`DirectionalModelForCausalLM.from_pretrained(adapter)`, which pairs an adapter with its own base)."
        )


def _load_config(path: Any, role: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, ...: one message naming the argument
        raise ValueError(
            f"`{role}` (={path!r}) could not be loaded as a model config ({type(err).__name__}: {err}); pass a local "
            "checkpoint folder or a hub id of a causal LM."
        ) from err


class DirectionalLLM:
    """vLLM's offline `LLM` for an RL model, decoding with selective replacement / extrapolation against its base.

    Args:
        model (`str`): the RL checkpoint (folder or hub id), as vLLM's `LLM(model=...)`.
        base_model (`str`): the base checkpoint (safetensors weights); same architecture and tokenizer.
        extrapolation_config (`ExtrapolationConfig` or `dict`, *optional*): the engine's default; a request overrides
            fields with `SamplingParams(extra_args={"extrapolation_config": {"gamma": 0.5}})`. Its temperature /
            top-k / top-p are ignored: each request's `SamplingParams` carries them.
        check_tokenizers (`bool`, defaults to True): refuse checkpoints that ship different tokenizers.
        **vllm_kwargs: vLLM's `LLM` arguments (`tensor_parallel_size`, `dtype`, `max_model_len`,
            `enable_prefix_caching`, `gpu_memory_utilization`, ...); `data_parallel_size` must stay 1 (one
            DirectionalLLM per device and a shard of the prompts each instead).
    """

    def __init__(
        self,
        model: str,
        base_model: str | None = None,
        extrapolation_config: ExtrapolationConfig | dict | None = None,
        *,
        check_tokenizers: bool = True,
        **vllm_kwargs: Any,
    ):
        from vllm import LLM

        from .model import ARCHITECTURE, CONFIG_KEY
        from .plugin import register

        if base_model is None:
            raise ValueError("`base_model` is required: the base checkpoint the RL model was trained from.")
        if isinstance(extrapolation_config, dict):
            extrapolation_config = ExtrapolationConfig.from_dict(extrapolation_config)
        elif extrapolation_config is None:
            extrapolation_config = ExtrapolationConfig()
        elif not isinstance(extrapolation_config, ExtrapolationConfig):
            raise TypeError(
                "`extrapolation_config` must be an ExtrapolationConfig or a dict, got "
                f"{type(extrapolation_config).__name__}."
            )
        for name, why in REFUSED_KWARGS.items():
            if vllm_kwargs.get(name):
                raise ValueError(f"`{name}` is not supported by DirectionalLLM: {why}.")
        if vllm_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise ValueError("`pipeline_parallel_size` must be 1 for DirectionalLLM; use `tensor_parallel_size`.")
        if vllm_kwargs.get("data_parallel_size", 1) != 1:
            raise ValueError(
                f"`data_parallel_size` (={vllm_kwargs['data_parallel_size']}) must be 1: vLLM's offline `LLM` does not "
                "run data parallel in one process (vLLM 0.32 refuses it too). Run one DirectionalLLM per process and "
                "device (e.g. CUDA_VISIBLE_DEVICES=i), each on its shard of the prompts (prompts[i::N]); with the "
                "command line, one `hf-extrapolate eval --engine vllm` per shard of --data, each with its own --output."
            )
        if vllm_kwargs.setdefault("logprobs_mode", "processed_logprobs") != "processed_logprobs":
            raise ValueError(
                f"`logprobs_mode` (={vllm_kwargs['logprobs_mode']!r}) must be 'processed_logprobs': the log-probs of "
                "the directional distribution each token is drawn from (raw ones would be the RL model's)."
            )
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
            raise ValueError("VLLM_USE_V2_MODEL_RUNNER is set: DirectionalLLM needs the V1 model runner (unset it).")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by vLLM's worker processes

        _refuse_adapter(model, "model")
        _refuse_adapter(base_model, "base_model")
        trust = bool(vllm_kwargs.get("trust_remote_code", False))
        rl_config = _load_config(model, "model", trust)
        base_config = _load_config(base_model, "base_model", trust)
        rl_arch, base_arch = ((getattr(c, "architectures", None) or [None])[0] for c in (rl_config, base_config))
        if rl_arch is None or rl_arch != base_arch or rl_config.model_type != base_config.model_type:
            raise ValueError(
                f"The RL model ({model}: {rl_arch}, {rl_config.model_type}) and the base model ({base_model}: "
                f"{base_arch}, {base_config.model_type}) must share one architecture: directional decoding pairs an "
                "RLVR model with the base it was trained from."
            )
        vocab_size = None
        if check_tokenizers:
            from ..modeling import check_same_tokenizer

            vocab_size = check_same_tokenizer(model, base_model)
        vocab_size = shared_vocab_size(
            rl_config.get_text_config().vocab_size, base_config.get_text_config().vocab_size, vocab_size
        )

        overrides = vllm_kwargs.pop("hf_overrides", None) or {}
        if not isinstance(overrides, dict):
            raise TypeError("`hf_overrides` must be a dict for DirectionalLLM (a callable cannot be merged).")
        base_path = os.path.abspath(base_model) if os.path.isdir(base_model) else base_model
        overrides = {
            **overrides,
            "architectures": [ARCHITECTURE],
            CONFIG_KEY: {
                "architecture": rl_arch,
                "base_model": base_path,
                "config": extrapolation_config.to_dict(),
                "vocab_size": vocab_size,
            },
        }
        register()
        self.extrapolation_config = extrapolation_config
        self.base_model = base_model
        self.llm = LLM(
            model=model,
            hf_overrides=overrides,
            logits_processors=[LOGITS_PROCESSOR],
            worker_extension_cls=WORKER_EXTENSION,
            **vllm_kwargs,
        )

    # ------------------------------------------------------------------ generation
    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> list:
        """vLLM's `LLM.generate` with directional decoding: one `RequestOutput` per prompt, each completion with
        `replace_ratio` (the mean replaced mass over its tokens) and `replaced_mass` (per token)."""
        from vllm import SamplingParams

        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"`sampling_params` has {len(params)} entries for {len(prompts)} prompts.")
        for key in ("lora_request", "prompt_adapter_request"):
            if kwargs.get(key) is not None:
                raise ValueError(f"`{key}` is not supported by DirectionalLLM: merge the adapter into the RL model.")

        flat_prompts, flat_params, groups = [], [], []
        for prompt, sp in zip(prompts, params):
            children = [self._request_params(sp, i) for i in range(sp.n)]
            groups.append(len(children))
            flat_prompts += [prompt] * len(children)
            flat_params += children
        outputs = self.llm.generate(flat_prompts, flat_params, **kwargs)
        keys = [p.extra_args["hf_extrapolate"]["key"] for p in flat_params]
        stats = self.llm.collective_rpc("hf_extrapolate_pop_stats", args=(keys,))[0]

        results, start = [], 0
        for size in groups:
            children = outputs[start : start + size]
            merged = copy.copy(children[0])
            merged.outputs = []
            for index, (child, key) in enumerate(zip(children, keys[start : start + size])):
                completion = copy.copy(child.outputs[0])
                completion.index = index
                masses = stats.get(key, {})
                completion.replaced_mass = [masses.get(t, float("nan")) for t in range(len(completion.token_ids))]
                n = len(completion.replaced_mass)
                completion.replace_ratio = sum(completion.replaced_mass) / n if n else float("nan")
                merged.outputs.append(completion)
            results.append(merged)
            start += size
        return results

    def chat(self, messages: Any, sampling_params: Any = None, *, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, **kwargs: Any) -> list:
        """`generate` on conversations (a list of `{"role", "content"}` dicts, or a list of them) rendered with the
        RL tokenizer's chat template."""
        tokenizer = self.get_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            ids = tokenizer.apply_chat_template(
                conv, tokenize=True, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, **kwargs)

    @staticmethod
    def _request_params(sp: Any, index: int) -> Any:
        """A copy of `sp` for completion `index`: n=1, seed + index, warpers moved inside, vLLM's sampler neutral."""
        from .logits_processor import REQUEST_KEY, check_request_params

        child = sp.clone()
        greedy = sp.temperature < 1e-5
        inner = {} if greedy else {"temperature": float(sp.temperature), "top_p": float(sp.top_p),
                                   "top_k": int(sp.top_k) if sp.top_k > 0 else 0}
        child.n = 1
        if sp.seed is not None:
            child.seed = sp.seed + index
        child.temperature = 0.0 if greedy else 1.0
        child.top_p, child.top_k = 1.0, 0
        child.extra_args = {**(sp.extra_args or {}), REQUEST_KEY: {"key": uuid.uuid4().hex, "sampling": inner}}
        check_request_params(child)
        return child
