"""`hf-extrapolate eval`: math evaluation of base, RL, selective replacement and extrapolation on the same prompts.

Also holds the options and loaders that `analyze` and `sweep` share. Data parallel: `accelerate launch -m
hf_extrapolate.cli eval ...` deals batches to the processes and merges their records into `--output`. `--engine vllm`
runs every mode on one vLLM engine instead (`hf_extrapolate.cli.engines`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import CRITERIA, PROPOSALS
from . import CLIError, choose_threads
from .engines import add_engine_arguments

logger = logging.getLogger(__name__)

MODES = ("base", "rl", "replace", "extrapolate")


# ---------------------------------------------------------------------------------------------- shared options
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--model", default=None,
                       help="the RL model: a folder or hub id for from_pretrained, or a pair folder written by "
                       "DirectionalModelForCausalLM.save_pretrained (its base is the recorded one) or a LoRA adapter "
                       "folder (same as --adapter)")
    group.add_argument("--base", default=None, help="the base model it was trained from (same tokenizer): a folder "
                       "or hub id")
    group.add_argument("--adapter", default=None,
                       help="LoRA adapter folder: the RL model is the base model with this adapter merged in "
                       "(--base defaults to the adapter's base model)")
    group.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: --model / --adapter)")
    group.add_argument("--no-tokenizer-check", dest="check_tokenizers", action="store_false",
                       help="skip the check that --model and --base ship the same tokenizer (a checkpoint without "
                       "tokenizer files is never compared)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, ... (default: the process's accelerator under accelerate launch, else "
                       "cuda when available, else cpu)")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights dtype (default auto: the checkpoint's on accelerators, float32 on cpu)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                       help="problem files with 'problem' and 'answer' per line, e.g. examples/data/aime24.jsonl")
    group.add_argument("--limit", type=int, default=None, help="use the first N problems of each file")


def add_sampling_arguments(
    parser: argparse.ArgumentParser, *, max_new_tokens: int = 1024,
    samples_help: str = "samples per problem: the k of Avg@k, Pass@k up to k (default: 1)",
) -> None:
    group = parser.add_argument_group("sampling (the same for every mode)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"response length limit (default: {max_new_tokens})")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0, off)")
    group.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0, off)")
    group.add_argument("--num-return-sequences", "-k", type=int, default=1, dest="num_return_sequences",
                       help=samples_help)
    group.add_argument("--seed", type=int, default=0, help="seed; batches are seeded alike in every mode (default: 0)")
    group.add_argument("--batch-size", type=int, default=8, help="problems per generate call (default: 8)")
    group.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                       help="wrap the prompt in the tokenizer's chat template (default: when the tokenizer has one); "
                       "--no-chat-template for raw prompts to base models")


def add_config_arguments(
    parser: argparse.ArgumentParser, *, criterion: bool = True, gamma: bool = True, modes: bool = True
) -> None:
    """The directional decoding options; `modes=False` for commands without an extrapolate mode (`generate`)."""
    where = " of the extrapolate mode" if modes else ""
    group = parser.add_argument_group("directional decoding")
    if criterion:
        group.add_argument("--criterion", default="logp_diff", choices=CRITERIA,
                           help="replacement criterion (default: logp_diff)")
        group.add_argument("--threshold", type=float, default=-0.3, help="tau of the criterion (default: -0.3)")
    if gamma:
        group.add_argument("--gamma", type=float, default=0.0,
                           help=f"extrapolation strength{where}; the paper uses 0.05-0.1 (default: 0)")
    group.add_argument("--proposal", default="base", choices=PROPOSALS,
                       help=f"the model that proposes each token{where} (default: base, as in Algorithm 1; rl: the "
                       "paper's Table 1 variant)")
    group.add_argument("--candidate-top-k", type=int, default=None,
                       help="restrict the replacement distribution to the proposal's top-k tokens (default: off)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output", required=True, help="result file (JSON Lines); an existing one is resumed")
    group.add_argument("--overwrite", action="store_true", help="start again instead of resuming --output")
    group.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots to DIR")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------- shared helpers
def process_state(args: argparse.Namespace) -> Any:
    """The `accelerate` process state (a single process without `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState(cpu=args.device == "cpu")


def _looks_local(value: str) -> bool:
    """A value that can only be a local path (a hub id is `name` or `org/name`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def resolve_pair_folder(args: argparse.Namespace) -> None:
    """`--model` naming a folder written by `save_pretrained` (or a LoRA adapter folder) stands for the whole pair:
    fill in `--base` from its record, or move it to `--adapter`."""
    from ..config import CONFIG_NAME
    from ..modeling import ADAPTER_CONFIG_NAME, _recorded_base, read_pair_record

    if args.adapter is not None or args.model is None or not os.path.isdir(args.model):
        return
    if os.path.isfile(os.path.join(args.model, ADAPTER_CONFIG_NAME)):
        args.adapter, args.model = args.model, None  # a LoRA adapter (or a saved LoRA pair): paired with its base
    elif os.path.isfile(os.path.join(args.model, CONFIG_NAME)) and args.base is None:
        try:
            args.base = _recorded_base(args.model, read_pair_record(args.model))
        except ValueError as err:
            raise CLIError(f"--model {args.model}: {err} (or give --base BASE)") from None


def check_model_paths(args: argparse.Namespace) -> None:
    """One clear error for a local model path that does not exist (before transformers' long one); a hub id
    (`org/name`) is left to `from_pretrained` (with HF_HUB_OFFLINE=1 it resolves from the local cache)."""
    for path, flag in ((args.model, "--model"), (args.base, "--base"), (args.adapter, "--adapter")):
        if path is not None and not os.path.exists(path) and _looks_local(path):
            raise CLIError(f"{flag} {path}: no such folder")
    resolve_pair_folder(args)
    if args.adapter is not None and os.path.isdir(args.adapter):
        from ..modeling import ADAPTER_CONFIG_NAME

        if not os.path.isfile(os.path.join(args.adapter, ADAPTER_CONFIG_NAME)):
            raise CLIError(f"--adapter {args.adapter}: no {ADAPTER_CONFIG_NAME}, so not a LoRA adapter folder; give a "
                           "full model as --model RL --base BASE")
    if args.adapter is None and (args.model is None or args.base is None):
        raise CLIError("give --model RL and --base BASE, --model SAVED_PAIR_DIR (written by save_pretrained), or "
                       "--adapter LORA_DIR (with --base if the adapter does not name its base model)")


def device_and_dtype(args: argparse.Namespace, state: Any = None) -> tuple[Any, Any]:
    """`--device` (the process's accelerator under `accelerate launch`) and `--dtype` (float32 on cpu for auto)."""
    import torch

    if state is not None and getattr(state, "num_processes", 1) > 1 and args.device in (None, "cuda"):
        device = state.device  # one accelerator per process
    elif args.device is not None:
        device = check_device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    return device, torch.float32 if device.type == "cpu" else "auto"


def check_device(name: str) -> Any:
    """`torch.device(name)`, or a one-line error when it is not a device or not available in this torch build."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    backend = getattr(torch, device.type, None)
    available = device.type == "cpu" or (
        backend is not None and hasattr(backend, "is_available") and backend.is_available()
    )
    if not available:
        raise CLIError(f"--device {name}: no {device.type} device is available to this torch build "
                       f"(torch {torch.__version__}); use --device cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise CLIError(f"--device {name}: only {count()} {device.type} device(s) here")
    return device


def load_model(path: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    logger.info("loading %s", path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise CLIError(f"cannot load {path}: {str(err).splitlines()[0]}") from None


def adapter_base_path(args: argparse.Namespace) -> str:
    from peft import PeftConfig

    return args.base or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path


def load_tokenizer(args: argparse.Namespace, *candidates: str | None) -> Any:
    """The first tokenizer found among `--tokenizer` and `candidates`; resolves `--chat-template` (None: the
    tokenizer's template when it has one)."""
    from transformers import AutoTokenizer

    tokenizer = None
    for candidate in (args.tokenizer, *candidates):
        if candidate is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
        except (OSError, ValueError, TypeError):
            if candidate == args.tokenizer:
                raise
    if tokenizer is None:
        raise CLIError("no tokenizer found with the models; pass --tokenizer")
    if args.chat_template is None:
        args.chat_template = bool(getattr(tokenizer, "chat_template", None))
    elif args.chat_template and not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat-template: the tokenizer has no chat template; use --no-chat-template")
    return tokenizer


def load_pair(args: argparse.Namespace, state: Any = None) -> tuple[Any, Any, Any]:
    """`(rl_model, base_model, tokenizer)` from `--model` / `--adapter`, `--base`, `--tokenizer`, on `--device`.

    With `--adapter` the RL model is the base with the adapter merged in (a second copy; `generate` pairs the
    adapter with its base in one copy instead).
    """
    check_model_paths(args)
    device, dtype = device_and_dtype(args, state)
    if args.adapter is not None:
        from peft import PeftModel

        base_path = adapter_base_path(args)
        rl_model = PeftModel.from_pretrained(load_model(base_path, dtype), args.adapter).merge_and_unload()
    else:
        base_path = args.base
        if args.check_tokenizers:
            from ..modeling import check_same_tokenizer

            check_same_tokenizer(args.model, base_path)
        rl_model = load_model(args.model, dtype)
    base_model = load_model(base_path, dtype)
    tokenizer = load_tokenizer(args, args.model, args.adapter, base_path)
    rl_model, base_model = rl_model.to(device).eval(), base_model.to(device).eval()
    choose_threads(args, rl_model, base_model)
    return rl_model, base_model, tokenizer


def load_problems_arg(args: argparse.Namespace) -> list:
    from ..evaluation import load_datasets

    return load_datasets(args.data, limit=args.limit)


def settings_from(args: argparse.Namespace) -> Any:
    from ..evaluation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        num_samples=args.num_return_sequences, seed=args.seed, batch_size=args.batch_size,
        chat_template=args.chat_template,
    )


def progress_bar(desc: str, enabled: bool) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A `progress(done, total)` callback drawing a tqdm bar on stderr, and a function that closes it."""
    bar: list[Any] = []

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        if not bar:
            from tqdm.auto import tqdm

            bar.append(tqdm(total=total, desc=desc, unit="batch", file=sys.stderr))
        bar[0].total = total
        bar[0].n = done
        bar[0].refresh()

    def close() -> None:
        if bar:
            bar[0].close()

    return update, close


def summary_path(output: str) -> Path:
    path = Path(output)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".summary.json")


def run_and_report(args: argparse.Namespace, rl_model, base_model, tokenizer, problems, modes, state, extra=None,
                   engine=None) -> int:
    """Evaluate `modes` (with the two models, or `engine`), then (main process) write the summary JSON, the plots and
    print the table."""
    from ..evaluation import evaluate, format_summary, summarize

    update, close = progress_bar(args.command, not args.no_progress and state.is_main_process)
    try:
        records = evaluate(
            rl_model, base_model, tokenizer, problems, modes, settings_from(args), output=args.output,
            resume=not args.overwrite, state=state, progress=update,
            scorer=getattr(args, "scorer", None) or "lenient", eos_token_id=getattr(args, "eos_token_id", None),
            engine=engine,
        )
    finally:
        close()
    if not state.is_main_process:
        return 0
    rows = summarize(records)
    summary = {"output": str(args.output), "summary": rows, **(extra or {})}
    path = summary_path(args.output)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if args.plots:
        from ..evaluation import plot_accuracy_vs_ratio, plot_problem_heatmap

        plot_accuracy_vs_ratio(rows, Path(args.plots) / "accuracy_vs_ratio.png")
        plot_problem_heatmap(records, Path(args.plots) / "per_problem_accuracy.png")
    sys.stdout.write(format_summary(rows))
    sys.stdout.write(f"records: {args.output}\nsummary: {path}\n" + (f"plots: {args.plots}\n" if args.plots else ""))
    return 0


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.candidate_top_k is None else {"candidate_top_k": args.candidate_top_k}


# ---------------------------------------------------------------------------------------------- eval
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="math evaluation (Avg@k, Pass@k) of base, RL, replacement and extrapolation",
        description="Sample every problem k times in each mode on the same prompts and seeds, check the last "
        "\\boxed{} with Math-Verify, and report Avg@k, Pass@k, response length and replacement ratio. Records go "
        "to --output (JSON Lines, resumed if it exists); the summary to <output>.summary.json. "
        "Data parallel: accelerate launch -m hf_extrapolate.cli eval ...",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--modes", nargs="+", default=["base", "rl", "replace"], choices=MODES,
                        help="modes to run: base, rl, replace (criterion + threshold, gamma 0), extrapolate "
                        "(criterion + threshold + gamma > 0 + proposal) (default: base rl replace)")
    add_config_arguments(parser)
    add_sampling_arguments(parser)
    add_protocol_arguments(parser)
    add_engine_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(handler=run)


# the paper's evaluation protocol (its reference code's `extrapolate.py` defaults and `run_extrapolate.sh`)
PAPER_PROTOCOL = {"num_return_sequences": 32, "temperature": 1.0, "top_p": 0.7, "top_k": 0, "max_new_tokens": 20000,
                  "chat_template": True, "scorer": "strict"}


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol and scoring")
    group.add_argument("--protocol", default=None, choices=("paper",),
                       help="paper: 32 samples per problem, temperature 1.0, top-p 0.7, up to 20000 new tokens, the "
                       "tokenizer's (= the RL model's) chat template, the strict scorer; report Avg@32 and Pass@k "
                       "up to 32 (the paper's Pass@16 included). Give it the paper's data: AIME-24/25 (and AMC)")
    group.add_argument("--scorer", default=None, choices=("lenient", "strict"),
                       help="lenient: the last complete \\boxed{}; strict: only the text after the last \\boxed "
                       "(the reference's rule) (default: lenient, strict with --protocol paper)")
    group.add_argument("--eos-token-id", type=int, nargs="+", default=None, metavar="ID",
                       help="token ids that end a response (default: the tokenizer's and the models' own)")


def apply_protocol(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """Set the settings of `--protocol`; an explicit flag that contradicts it is an error naming both."""
    if getattr(args, "protocol", None) != "paper":
        return
    for name, value in PAPER_PROTOCOL.items():
        given = getattr(args, name)
        if given is not None and given != parser_defaults.get(name) and given != value:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"--protocol paper sets {flag} {value}, but {flag} {given} was given; drop one of them")
        setattr(args, name, value)


def build_modes(args: argparse.Namespace) -> list:
    from ..evaluation import EvalMode

    modes = []
    for name in dict.fromkeys(args.modes):
        if name == "base":
            modes.append(EvalMode.base())
        elif name == "rl":
            modes.append(EvalMode.rl())
        elif name == "replace":
            modes.append(EvalMode.replace(args.criterion, args.threshold, **config_overrides(args)))
        else:
            if args.gamma <= 0:
                raise CLIError(f"--modes extrapolate needs --gamma > 0 (got {args.gamma}); the paper uses 0.05-0.1.")
            modes.append(EvalMode.extrapolate(args.criterion, args.threshold, args.gamma, args.proposal,
                                              **config_overrides(args)))
    return modes


_EVAL_DEFAULTS = {"num_return_sequences": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 1024,
                  "chat_template": None, "scorer": None}


def run(args: argparse.Namespace) -> int:
    apply_protocol(args, _EVAL_DEFAULTS)
    problems = load_problems_arg(args)
    modes = build_modes(args)
    state = process_state(args)
    if args.engine == "vllm":
        from .engines import load_vllm_engine

        engine, tokenizer = load_vllm_engine(args, state)
        return run_and_report(args, None, None, tokenizer, problems, modes, state, engine=engine)
    rl_model, base_model, tokenizer = load_pair(args, state)
    return run_and_report(args, rl_model, base_model, tokenizer, problems, modes, state)
