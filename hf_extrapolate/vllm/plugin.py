"""Registers `DirectionalForCausalLM` with vLLM's model registry (entry point `vllm.general_plugins`, so that it
happens in every vLLM process, workers included)."""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from .model import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "hf_extrapolate.vllm.model:DirectionalForCausalLM")
