"""`hf-extrapolate generate`: completions with selective replacement / extrapolation, with their replacement ratio.

    hf-extrapolate generate --model RL --base BASE --prompt "What is 2+3?" --gamma 0.1
    hf-extrapolate generate --adapter LORA_DIR --prompts-file prompts.jsonl --output out.jsonl

Each prompt file line is a JSON object with `prompt` (or `problem`). Output: one JSON line per completion with
`index`, `sample`, `prompt`, `completion`, `num_tokens` and `replace_ratio`.
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


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    prompts = _read_prompts(args)
    config = ExtrapolationConfig(
        proposal=args.proposal, criterion=args.criterion, threshold=args.threshold, gamma=args.gamma,
        candidate_top_k=args.candidate_top_k,
    )
    if args.num_return_sequences < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise CLIError("--num-return-sequences, --batch-size and --max-new-tokens must be positive")
    model, tokenizer = load_directional_model(args)
    model.extrapolation_config = config
    use_template = args.chat_template
    if args.reasoning_prompt:
        from ..evaluation.prompts import format_question

        prompts_sent = [format_question(t) for t in prompts]
    else:
        prompts_sent = prompts
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        if use_template else t
        for t in prompts_sent
    ]
    do_sample = args.temperature > 0
    sampling = dict(do_sample=do_sample)
    if do_sample:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    torch.manual_seed(args.seed)
    out_file = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        batches = range(0, len(texts), args.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=out_file is None or len(batches) == 1)
        for start in bar:
            chunk = texts[start : start + args.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not use_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(
                **enc, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_return_sequences,
                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **sampling,
            )
            width = enc["input_ids"].shape[1]
            ratios = out.replace_ratio.tolist()
            lengths = generated_mask(out.sequences, width, model.generation_config.eos_token_id).sum(-1).tolist()
            for row, seq in enumerate(out.sequences):
                index, sample = start + row // args.num_return_sequences, row % args.num_return_sequences
                gen = seq[width:]
                record = {
                    "index": index, "sample": sample, "prompt": prompts[index],
                    "completion": tokenizer.decode(gen, skip_special_tokens=True),
                    "num_tokens": int(lengths[row]),
                    "replace_ratio": round(ratios[row], 6),
                }
                line = json.dumps(record, ensure_ascii=False)
                if out_file is not None:
                    out_file.write(line + "\n")
                else:
                    sys.stdout.write(line + "\n")
    finally:
        if out_file is not None:
            out_file.close()
    return 0
