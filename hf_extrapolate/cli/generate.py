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

from ..config import CRITERIA, PROPOSALS, ExtrapolationConfig
from ..statistics import generated_mask
from . import CLIError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate completions with selective replacement / extrapolation",
        description="Generate with the RL model, redrawing the tokens the criterion flags from "
        "pi_rl^(1+gamma) / pi_base^gamma (gamma=0: plain replacement by the RL model).",
    )
    models = p.add_argument_group("models")
    models.add_argument("--model", help="RL model folder or hub id (or a folder written by save_pretrained)")
    models.add_argument("--base", help="base model folder or hub id (same tokenizer as the RL model)")
    models.add_argument("--adapter", help="LoRA adapter folder: the RL model is base + adapter, loaded once")
    models.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    models.add_argument("--dtype", default="auto", choices=tuple(DTYPES), help="weights dtype (default: auto)")
    prompts = p.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts-file", metavar="FILE.jsonl", help="JSON lines with 'prompt' (or 'problem')")
    method = p.add_argument_group("method (ExtrapolationConfig)")
    method.add_argument("--criterion", default="logp_diff", choices=CRITERIA, help="default: logp_diff")
    method.add_argument("--threshold", type=float, default=-0.3, help="tau of the criterion (default: -0.3)")
    method.add_argument("--gamma", type=float, default=0.0, help="extrapolation strength (default: 0, replace only)")
    method.add_argument("--proposal", default="base", choices=PROPOSALS, help="model drawn from first (default: base)")
    method.add_argument("--candidate-top-k", type=int, default=None, help="restrict the redraw to the proposal's top-k")
    samp = p.add_argument_group("sampling")
    samp.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    samp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    samp.add_argument("--top-p", type=float, default=1.0, help="default: 1.0 (off)")
    samp.add_argument("--top-k", type=int, default=0, help="default: 0 (off)")
    samp.add_argument("--num-return-sequences", type=int, default=1, help="samples per prompt (default: 1)")
    samp.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    samp.add_argument("--seed", type=int, default=0, help="default: 0")
    samp.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                      help="wrap prompts in the tokenizer's chat template (default: when the tokenizer has one)")
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


def load_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    """The `DirectionalModelForCausalLM` and tokenizer the arguments name (one clear error if they can't load)."""
    from transformers import AutoTokenizer

    from ..modeling import DirectionalModelForCausalLM

    if args.adapter is None and args.model is None:
        raise CLIError("give --model (and --base), or --adapter")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": DTYPES[args.dtype] if args.dtype != "auto" or device != "cpu" else torch.float32}
    source = args.adapter if args.adapter is not None else args.model
    for path, flag in ((args.adapter, "--adapter"), (args.model, "--model"), (args.base, "--base")):
        if path is not None and (path.startswith((".", "/")) or os.sep in path) and not os.path.exists(path):
            raise CLIError(f"{flag} {path}: no such folder")
    try:
        model = DirectionalModelForCausalLM.from_pretrained(source, base_model=args.base, **kwargs)
    except OSError as err:
        raise CLIError(f"cannot load the models: {str(err).splitlines()[0]}") from None
    model.rl_model.to(device)
    model.reference_model.to(device)
    tokenizer = None
    for candidate in (source, args.base, getattr(model, "base_model_name_or_path", None)):
        if candidate is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
        except (OSError, ValueError, TypeError):
            continue
    if tokenizer is None:
        raise CLIError(f"no tokenizer found in {source} or the base model")
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
    model, tokenizer = load_pair(args)
    model.extrapolation_config = config
    use_template = args.chat_template if args.chat_template is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_template and not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat-template: the tokenizer has no chat template; use --no-chat-template")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        if use_template else t
        for t in prompts
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
