"""DirectionalLLM under a KV cache so small that requests are preempted and recomputed, and its refusals (checked
before any engine starts)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the [vllm] environment: see .ci/run)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from hf_extrapolate import ExtrapolationConfig  # noqa: E402
from hf_extrapolate.vllm import DirectionalLLM  # noqa: E402
from tests.vllm.conftest import ENGINE_KWARGS  # noqa: E402
from tests.vllm.reference import Recompute  # noqa: E402


def _preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_stay_exact(pair):
    rl, base = pair
    config = ExtrapolationConfig(threshold=-0.5, gamma=0.2)
    # 4 KV blocks of 32 tokens (128 tokens) for 4 requests of 12 + 40 tokens: not all fit at once
    llm = DirectionalLLM(rl, base_model=base, extrapolation_config=config, block_size=32, num_gpu_blocks_override=4,
                         enable_prefix_caching=False, disable_log_stats=False,
                         **{**ENGINE_KWARGS, "max_model_len": 96})
    prompts = [[1] + [3 + (5 * i + j) % 80 for j in range(11)] for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert _preemptions(llm) > 0
    recompute = Recompute(rl, base)
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        assert list(completion.token_ids) == recompute.greedy(prompt, 40, config, eos=-1)
        _, mass = recompute.steps(prompt, list(completion.token_ids), config, greedy=True)
        assert completion.replaced_mass == mass.tolist()


def test_different_vocabularies_are_refused(pair, tmp_path):
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_tokenizer
    from tests.vllm.pair import tiny_config

    other = tmp_path / "other"
    LlamaForCausalLM(tiny_config(200)).save_pretrained(other)
    tiny_tokenizer(200).save_pretrained(other)
    with pytest.raises(ValueError, match="different"):
        DirectionalLLM(pair[0], base_model=str(other), **ENGINE_KWARGS)
    with pytest.raises(ValueError, match="different vocabularies"):
        DirectionalLLM(pair[0], base_model=str(other), check_tokenizers=False, **ENGINE_KWARGS)


def test_missing_base_and_lora_adapter_are_refused(pair, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="base_model.*could not be loaded"):
        DirectionalLLM(pair[0], base_model=str(tmp_path / "missing"), **ENGINE_KWARGS)
    with pytest.raises(ValueError, match="base_model"):
        DirectionalLLM(pair[0], **ENGINE_KWARGS)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32),
                                LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    assert os.path.isfile(adapter / "adapter_config.json")
    with pytest.raises(ValueError, match="merge_and_unload"):
        DirectionalLLM(str(adapter), base_model=pair[1], **ENGINE_KWARGS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative"),
    (dict(pipeline_parallel_size=2), "pipeline_parallel_size"),
    (dict(data_parallel_size=2), "one DirectionalLLM per process"),
    (dict(logprobs_mode="raw_logprobs"), "processed_logprobs"),
    (dict(enable_lora=True), "merge"),
])
def test_engine_features_that_cannot_work_are_refused(pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectionalLLM(pair[0], base_model=pair[1], **{**ENGINE_KWARGS, **kwargs})
