"""`hf-extrapolate demo`: the paper's story in one minute, offline, on the built-in toy base/RLVR pair.

It solves a few held-out arithmetic problems with the base model, the RL model, token replacement (Algorithm 1),
Selective Extrapolate (the base proposing, the paper's Fig. 4) and extrapolation on the RL model (Table 1), shows
the tokens that were redrawn (highlighted), and prints the accuracy of each mode on more held-out problems, all with
the same seeds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..config import CRITERIA, ExtrapolationConfig
from . import CLIError, choose_threads

HIGHLIGHT, RESET = "\033[1;33m", "\033[0m"
# the gate and strength used in the toy pair's README table (tau: ~5% of base tokens fall below it)
DEFAULT_THRESHOLD, DEFAULT_GAMMA = -0.3, 0.1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="base vs RL vs token replacement vs selective extrapolation on the built-in toy pair (offline; "
        "0.5-2 min on a busy 2-core CPU)",
        description="Runs the built-in toy base/RLVR pair (a tiny Llama trained by this library on multi-step "
        "arithmetic) on held-out problems: the completions of each mode with the redrawn tokens highlighted, then "
        "an accuracy table over --eval-problems problems.",
    )
    p.add_argument("--pair", default=None, metavar="DIR", help="a pair built by `hf-extrapolate toy-pair` (default: "
                   "the one shipped with the package)")
    p.add_argument("--show", type=int, default=4, help="problems shown with their completions (default: 4)")
    p.add_argument("--eval-problems", type=int, default=200, help="problems in the accuracy table (default: 200)")
    p.add_argument("--samples", type=int, default=4, help="samples per problem in the table (default: 4)")
    p.add_argument("--criterion", default="logp_diff", choices=CRITERIA, help="default: logp_diff")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="tau: redraw where the criterion fires (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="extrapolation strength (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="highlight redrawn tokens with ANSI colours (default: when printing to a terminal); "
                   "without colour they are shown in [brackets]")
    p.set_defaults(handler=run)


def _highlight(tokenizer: Any, ids: list[int], redrawn: list[float] | None, color: bool) -> str:
    """The completion, with the tokens redrawn with probability >= 1/2 highlighted (none when `redrawn` is None)."""
    parts = []
    for i, token in enumerate(ids):
        text = tokenizer.decode([token], skip_special_tokens=True)
        if text and redrawn is not None and redrawn[i] >= 0.5:
            text = f"{HIGHLIGHT}{text}{RESET}" if color else f"[{text}]"
        parts.append(text)
    return "".join(parts)


def _generate(model: Any, tokenizer: Any, problems: list, mode: str, cfg: ExtrapolationConfig, args, samples: int):
    """Completions, per-token redraw probabilities and replace ratios of `mode` for `problems` (seeded)."""
    from ..toy.train import chat_inputs

    enc = chat_inputs(tokenizer, problems)
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0}
        if args.temperature > 0 else {"do_sample": False}
    )
    common = dict(max_new_tokens=48, num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, **sampling)
    torch.manual_seed(args.seed)
    width = enc["input_ids"].shape[1]
    if mode in ("base", "rl"):
        plain = model.reference_model if mode == "base" else model.rl_model
        out = plain.generate(**enc, **common)
        flag = 0.0 if mode == "base" else 1.0
        redrawn = torch.full(out[:, width:].shape, flag)
        ratio = torch.full((out.shape[0],), flag)
    else:
        res = model.generate(**enc, **common, return_dict_in_generate=True, extrapolation_config=cfg)
        out, redrawn, ratio = res.sequences, res.replaced_token_probability.nan_to_num(0.0), res.replace_ratio
    return out[:, width:], redrawn, ratio


def _check_args(args: argparse.Namespace) -> None:
    for name in ("show", "eval_problems", "samples"):
        low = 0 if name == "show" else 1
        if getattr(args, name) < low:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be >= {low}, got {getattr(args, name)}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from transformers.utils import logging as hf_logging

    from ..modeling import DirectionalModelForCausalLM
    from ..toy import ToyPairConfig, held_out_problems, load_toy_pair, toy_pair_info, verify

    hf_logging.disable_progress_bar()  # this process is ours: no "Loading weights" bars around the demo's output
    rl_model, base_model, tokenizer = load_toy_pair(args.pair)
    choose_threads(args, rl_model, base_model)  # 341k parameters: one thread (--threads N to change)
    info = toy_pair_info(args.pair)
    threshold, gamma = args.threshold, args.gamma
    # Token replacement (Algorithm 1): the base proposes, the RL model redraws where the criterion fires
    replace = ExtrapolationConfig(proposal="base", criterion=args.criterion, threshold=threshold, gamma=0.0)
    # Selective Extrapolate (the paper's Fig. 4): the base proposes, pi_RL^(1+g) / pi_base^g redraws where it fires
    selective = replace.replace(gamma=gamma)
    # the paper's Table 1: the RL model proposes, pi_RL^(1+g) / pi_base^g redraws where it fires
    on_rl = selective.replace(proposal="rl")
    model = DirectionalModelForCausalLM.from_models(rl_model, base_model, selective)
    color = args.color if args.color is not None else sys.stdout.isatty()
    modes = [("base", "base", None), ("rl", "RL", None),
             ("replace", f"Token Replacement (τ={threshold:g})", replace),
             ("selective", f"Selective Extrapolate (γ={gamma:g})", selective),
             ("on_rl", f"RL + Selective Extrapolate (γ={gamma:g})", on_rl)]
    write = sys.stdout.write

    # the held-out problems of the pair's own task (a pair built with other settings has other problems)
    config = ToyPairConfig(**info["rl"]["config"]) if "config" in info.get("rl", {}) else None
    problems = held_out_problems(config, n=max(args.show, args.eval_problems))
    shown = problems[: args.show]
    parameters = info.get("rl", {}).get("model", {}).get("num_parameters")
    size = f"{parameters:,} parameters" if isinstance(parameters, int) else "a tiny Llama"
    write(f"hf-extrapolate demo: the built-in toy pair ({size}), "
          f"criterion {args.criterion}; redrawn tokens are {'highlighted' if color else 'in [brackets]'}.\n"
          "  Token Replacement: the base model proposes each token, the RL model redraws it where the criterion "
          "fires (Algorithm 1)\n"
          "  Selective Extrapolate: the base model proposes, pi_RL^(1+γ) / pi_base^γ redraws where it fires "
          "(Eq. 7; the paper's Fig. 4)\n"
          "  RL + Selective Extrapolate: the RL model proposes, pi_RL^(1+γ) / pi_base^γ redraws where it fires "
          "(the paper's Table 1)\n")
    completions = {key: _generate(model, tokenizer, shown, key, cfg, args, 1) for key, _, cfg in modes}
    for i, problem in enumerate(shown):
        write(f"\n{problem.statement}   (answer {problem.answer})\n")
        for key, label, cfg in modes:
            ids, redrawn, _ = completions[key]
            n = int((ids[i] != tokenizer.pad_token_id).sum())
            marks = redrawn[i, :n].tolist() if cfg is not None else None
            text = _highlight(tokenizer, ids[i, :n].tolist(), marks, color)
            ok = verify(tokenizer.decode(ids[i], skip_special_tokens=True), problem.answer) == 1.0
            write(f"  {label:<38} {'✓' if ok else '✗'}  {text.strip()!s}\n".replace("\n", " ").rstrip() + "\n")

    table = problems[: args.eval_problems]
    write(f"\nAccuracy on {len(table)} held-out problems, {args.samples} sample(s) each, same seeds:\n")
    write(f"  {'mode':<40}{'accuracy':>10}{'replaced':>10}\n")
    for key, label, cfg in modes:
        ids, _, ratio = _generate(model, tokenizer, table, key, cfg, args, args.samples)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        answers = [p.answer for p in table for _ in range(args.samples)]
        acc = sum(verify(t, a) for t, a in zip(texts, answers)) / len(texts)
        write(f"  {label:<40}{acc:>10.1%}{float(ratio.mean()):>10.1%}\n")
    return 0
