"""`hf-extrapolate generate`: completions with selective replacement / extrapolation, with their replacement ratio.

    hf-extrapolate generate --model RL --base BASE --prompt "What is 2+3?" --gamma 0.1
    hf-extrapolate generate --adapter LORA_DIR --prompts-file prompts.jsonl --output out.jsonl

Each prompt file line is a JSON object with `prompt` (or `problem`). Output: one JSON line per completion with
`index`, `sample`, `prompt`, `completion`, `num_tokens` and `replace_ratio`. `--engine vllm` generates every prompt
in one `hf_extrapolate.vllm.DirectionalLLM` call (same records; prompt `i` seeded `request_seed(--seed, i)`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from ..config import ExtrapolationConfig
from ..statistics import generated_mask
from . import CLIError, choose_threads
from .engines import add_engine_arguments
from .eval import (
    adapter_base_path,
    add_config_arguments,
    add_model_arguments,
    add_sampling_arguments,
    check_model_paths,
    device_and_dtype,
    load_model,
    load_tokenizer,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate completions with selective replacement / extrapolation",
        description="Selective token replacement (the paper's Algorithm 1) and extrapolation (Eq. 7): the "
        "--proposal model (default: base, as in Algorithm 1 and the paper's extrapolation runs) proposes each token, "
        "and where the criterion fires the token is redrawn from pi_rl^(1+gamma) / pi_base^gamma (gamma=0: plain "
        "replacement by the RL model). With --criterion never the output is the proposal model's; --proposal rl is "
        "the paper's Table 1 variant (the RL model proposes). With --adapter the LoRA adapter and its base share one "
        "copy of the base weights.",
    )
    add_model_arguments(p)
    prompts = p.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts-file", metavar="FILE.jsonl", help="JSON lines with 'prompt' (or 'problem')")
    p.add_argument("--reasoning-prompt", action="store_true",
                   help="append the paper's instruction ('Please reason step by step, and put your final answer "
                   "within \\boxed{}.') on a new line, as `eval` does, so the two send the same prompt")
    add_config_arguments(p, modes=False)
    add_sampling_arguments(p, max_new_tokens=256, samples_help="completions per prompt (default: 1)")
    add_engine_arguments(p)
    p.add_argument("--output", metavar="FILE.jsonl", help="write JSON lines here instead of printing")
    p.set_defaults(handler=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.prompts_file):
        raise CLIError(f"--prompts-file {args.prompts_file}: no such file")
    prompts = []
    with open(args.prompts_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{args.prompts_file}:{n}: not JSON ({err.msg})") from None
            text = row.get("prompt", row.get("problem")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise CLIError(f"{args.prompts_file}:{n}: needs a string field 'prompt' (or 'problem')")
            prompts.append(text)
    if not prompts:
        raise CLIError(f"{args.prompts_file}: no prompts")
    return prompts


def load_directional_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The `DirectionalModelForCausalLM` and tokenizer the arguments name (one clear error if they can't load)."""
    from ..modeling import DirectionalModelForCausalLM

    check_model_paths(args)
    device, dtype = device_and_dtype(args)
    if args.adapter is not None:
        from peft import PeftModel

        base_path = adapter_base_path(args)
        peft_model = PeftModel.from_pretrained(load_model(base_path, dtype), args.adapter).to(device).eval()
        model = DirectionalModelForCausalLM.from_peft(peft_model)
    else:
        from ..modeling import check_same_tokenizer

        base_path = args.base
        vocab_size = check_same_tokenizer(args.model, args.base) if args.check_tokenizers else None
        model = DirectionalModelForCausalLM(
            load_model(args.model, dtype).to(device).eval(), load_model(args.base, dtype).to(device).eval(),
            base_model_name_or_path=args.base, vocab_size=vocab_size,
        )
    choose_threads(args, model.rl_model, model.reference_model)
    tokenizer = load_tokenizer(args, args.model, args.adapter, base_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _prompt_texts(args: argparse.Namespace, tokenizer: Any, prompts: list[str]) -> list[str]:
    """The texts sent: `--reasoning-prompt` appended, wrapped in the chat template when `args.chat_template`."""
    if args.reasoning_prompt:
        from ..evaluation.prompts import format_question

        prompts = [format_question(t) for t in prompts]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        if args.chat_template else t
        for t in prompts
    ]


class _Records:
    """Writes one JSON line per completion to `--output` (or stdout)."""

    def __init__(self, output: str | None):
        self.file = open(output, "w", encoding="utf-8") if output else None

    def write(self, index: int, sample: int, prompt: str, completion: str, num_tokens: int, ratio: float) -> None:
        record = {"index": index, "sample": sample, "prompt": prompt, "completion": completion,
                  "num_tokens": int(num_tokens), "replace_ratio": round(ratio, 6)}
        (self.file or sys.stdout).write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    prompts = _read_prompts(args)
    config = ExtrapolationConfig(
        proposal=args.proposal, criterion=args.criterion, threshold=args.threshold, gamma=args.gamma,
        candidate_top_k=args.candidate_top_k,
    )
    if args.num_return_sequences < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise CLIError("--num-return-sequences, --batch-size and --max-new-tokens must be positive")
    if args.engine == "vllm":
        return _run_vllm(args, prompts, config)
    model, tokenizer = load_directional_model(args)
    model.extrapolation_config = config
    use_template = args.chat_template
    texts = _prompt_texts(args, tokenizer, prompts)
    do_sample = args.temperature > 0
    sampling = dict(do_sample=do_sample)
    if do_sample:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    torch.manual_seed(args.seed)
    out = _Records(args.output)
    try:
        batches = range(0, len(texts), args.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=args.output is None or len(batches) == 1)
        for start in bar:
            chunk = texts[start : start + args.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not use_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            generated = model.generate(
                **enc, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_return_sequences,
                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **sampling,
            )
            width = enc["input_ids"].shape[1]
            ratios = generated.replace_ratio.tolist()
            lengths = generated_mask(generated.sequences, width, model.generation_config.eos_token_id).sum(-1).tolist()
            for row, seq in enumerate(generated.sequences):
                index, sample = start + row // args.num_return_sequences, row % args.num_return_sequences
                out.write(index, sample, prompts[index], tokenizer.decode(seq[width:], skip_special_tokens=True),
                          lengths[row], ratios[row])
    finally:
        out.close()
    return 0


def _run_vllm(args: argparse.Namespace, prompts: list[str], config: ExtrapolationConfig) -> int:
    """`generate --engine vllm`: every prompt in one DirectionalLLM call, stopping where the transformers engine
    stops (the RL checkpoint's generation-config end-of-sequence ids)."""
    from ..evaluation.generation import eos_token_ids
    from .engines import check_vllm_run, checkpoint_generation_config, load_vllm_tokenizer, start_directional_llm

    check_vllm_run(args)
    tokenizer = load_vllm_tokenizer(args)
    texts = _prompt_texts(args, tokenizer, prompts)
    token_ids = [list(tokenizer(t, add_special_tokens=not args.chat_template)["input_ids"]) for t in texts]
    eos = eos_token_ids(checkpoint_generation_config(args.model))
    llm = start_directional_llm(args, config)
    from vllm import SamplingParams

    from ..vllm.evaluation import request_seed

    sampled = args.temperature > 0
    params = [
        SamplingParams(n=args.num_return_sequences, max_tokens=args.max_new_tokens,
                       temperature=args.temperature if sampled else 0.0, top_p=args.top_p if sampled else 1.0,
                       top_k=args.top_k if sampled else 0, seed=request_seed(args.seed, i) if sampled else None,
                       ignore_eos=True, stop_token_ids=eos, detokenize=False,
                       extra_args={"extrapolation_config": config.to_dict()})
        for i in range(len(token_ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=args.output is not None)
    out = _Records(args.output)
    try:
        for index, request in enumerate(outputs):
            for sample, completion in enumerate(request.outputs):
                ids = list(completion.token_ids)
                out.write(index, sample, prompts[index], tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                          completion.replace_ratio)
    finally:
        out.close()
    return 0
