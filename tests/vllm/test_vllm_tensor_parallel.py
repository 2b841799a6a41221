"""DirectionalLLM with `tensor_parallel_size=2` (both networks sharded over two CPU worker processes, vLLM's gloo /
shared-memory backend) against the transformers full recompute: greedy tokens, replaced mass, and log q of sampled
tokens. Set HF_EXTRAPOLATE_SKIP_TP=1 to skip it (one more engine start, about 45 s on 2 cores)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the [vllm] environment: see .ci/run)")

from vllm import SamplingParams  # noqa: E402

from hf_extrapolate import ExtrapolationConfig  # noqa: E402
from hf_extrapolate.vllm import DirectionalLLM  # noqa: E402
from tests.vllm.conftest import ENGINE_KWARGS  # noqa: E402
from tests.vllm.reference import Recompute  # noqa: E402
from tests.vllm.test_vllm_directional import PROMPTS, _check_greedy, _check_sampled  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("HF_EXTRAPOLATE_SKIP_TP") == "1", reason="HF_EXTRAPOLATE_SKIP_TP=1")


def test_tensor_parallel_2_is_the_recompute(pair, monkeypatch):
    rl, base = pair
    config = ExtrapolationConfig(threshold=-0.5, gamma=0.2)
    # vLLM's automatic CPU binding wants one NUMA node per rank; this box has one: bind rank i to core i by hand
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = DirectionalLLM(rl, base_model=base, extrapolation_config=config, tensor_parallel_size=2, **ENGINE_KWARGS)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert llm.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    recompute = Recompute(rl, base)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    _check_greedy(recompute, PROMPTS, greedy, config, 12)
    sampled = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=4, logprobs=4,
                                                   ignore_eos=True))
    inner = config.replace(temperature=0.8, top_p=0.9)
    for prompt, out in zip(PROMPTS, sampled):
        _check_sampled(recompute, prompt, out.outputs[0], inner, k=4)
