"""Build the toy base/RLVR pair: SFT a tiny `LlamaForCausalLM` on imperfect traces, then DAPO it with TRL.

`build_toy_pair(out_dir)` writes two normal HF model folders, `out_dir/base` and `out_dir/rl`, each with its
tokenizer and a `toy_pair.json` (config, seeds, held-out accuracies), and `out_dir/held_out.jsonl` (the evaluation
problems in the format of `hf_extrapolate.evaluation`):

1. **base**: a plain torch loop of next-token cross-entropy on the completions of imperfect chat traces
   (`hf_extrapolate.toy.task.imperfect_trace`) mixed with plain-text worked examples (all tokens), fresh
   train-split problems every step;
2. **rl**: TRL's `GRPOTrainer` from the base with `loss_type="dapo"`, clip-higher (`epsilon=0.2`,
   `epsilon_high=0.28`), no KL (`beta=0`), group-normalised advantages, two mini-batch steps per rollout, and the
   verifier (1/0 from the last `\\boxed{}`) as the only reward, unweighted.
   (`train_rl(..., advantage_reweighting="lowprob")` trains with the paper's Eq. 8 advantage reweighting instead,
   through `hf_extrapolate.training.DirectionalGRPOTrainer`: `benchmarks/toy_training.py` compares the two.)

Deviations from DAPO as published: no dynamic sampling (groups whose rewards are all equal get zero advantage and
so no gradient, but they are not refilled) and no overlong reward shaping (truncated completions are masked out of
the loss instead). Accuracies are measured with plain `model.generate` on held-out problems (their expressions are
never trained on), greedy and sampled at temperature 1, after the weights are rounded to the dtype they are saved
in, so the numbers in `toy_pair.json` are those of the saved folders.

Everything is seeded (`seed`) and runs on one CPU thread by default (about 6.5 minutes on a shared 2-core box);
two builds with the same torch build, CPU and thread count give bit-identical weights. This module logs; progress
bars belong to the CLI (pass `progress`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .task import (
    Problem,
    TaskConfig,
    accuracy,
    boxed_reward,
    imperfect_trace,
    sample_problems,
    worked_example,
    write_problems_jsonl,
)
from .tokenizer import build_toy_tokenizer

logger = logging.getLogger(__name__)

PAIR_INFO_NAME = "toy_pair.json"
HELD_OUT_NAME = "held_out.jsonl"  # the evaluation problems, for `hf-extrapolate eval --data`
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# A progress callback: (stage, done, total), stage in {"sft", "rl", "eval"}.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ToyPairConfig:
    """How the toy pair is built: task, model size, the SFT stage, the RLVR (DAPO) stage and the evaluation."""

    seed: int = field(default=0, metadata={"help": "Seed of problems, traces, initialisation and sampling."})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "Problems and imperfect traces."})

    # model
    hidden_size: int = field(default=96, metadata={"help": "Width of the LlamaForCausalLM."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Number of decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads (also key/value heads)."})

    # SFT (base)
    sft_steps: int = field(default=800, metadata={"help": "Optimizer steps of the base stage."})
    sft_batch_size: int = field(default=64, metadata={"help": "Traces per SFT step (fresh problems each step)."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    sft_warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps of the SFT schedule."})
    sft_documents: int = field(
        default=16,
        metadata={
            "help": "Plain-text worked examples (statement + correct trace, no chat template) per SFT step, next to "
            "the imperfect chat traces: the 'pretraining' that teaches the skill, while the chats teach the habits."
        },
    )

    # RLVR (DAPO on TRL)
    rl_steps: int = field(default=250, metadata={"help": "GRPOTrainer optimizer steps (`max_steps`)."})
    rl_prompts_per_generation: int = field(default=32, metadata={"help": "Distinct problems per rollout batch."})
    rl_num_generations: int = field(default=8, metadata={"help": "Completions per problem (the group size)."})
    rl_steps_per_generation: int = field(
        default=2,
        metadata={
            "help": "Optimizer steps (mini-batches) per rollout batch; above 1 the later steps are off-policy and "
            "the clipping (epsilon, epsilon_high) acts, as in DAPO."
        },
    )
    rl_learning_rate: float = field(default=1e-4, metadata={"help": "Constant AdamW learning rate of the RL stage."})
    rl_train_problems: int = field(default=4096, metadata={"help": "Size of the RL prompt set (train split)."})
    max_completion_length: int = field(default=48, metadata={"help": "Max new tokens in RL and evaluation."})

    # evaluation and saving
    eval_problems: int = field(default=200, metadata={"help": "Held-out problems for the reported accuracies."})
    eval_samples: int = field(
        default=4, metadata={"help": "Completions per problem for the sampled (temperature 1) accuracy."}
    )
    eval_seed: int = field(default=12345, metadata={"help": "Seed of the held-out problems and of sampling."})
    save_dtype: str = field(default="float32", metadata={"help": "dtype of the saved weights: " + str(SAVE_DTYPES)})
    num_threads: int | None = field(
        default=1,
        metadata={
            "help": "torch CPU threads during the build (restored after). 1 makes the result independent of the core "
            "count and robust on a busy machine; None keeps torch's setting."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.task, dict):
            self.task = TaskConfig(**self.task)
        positive = (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "sft_steps",
            "sft_batch_size", "rl_prompts_per_generation", "rl_num_generations", "rl_steps_per_generation", "rl_train_problems",
            "max_completion_length", "eval_problems", "eval_samples",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` (={value!r}) must be a positive integer.")
        for name in ("rl_steps", "sft_warmup_steps", "sft_documents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` (={value!r}) must be a non-negative integer (0 skips it).")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` (={self.hidden_size}) must be divisible by `num_attention_heads` "
                f"(={self.num_attention_heads})."
            )
        if self.rl_num_generations < 2:
            raise ValueError(
                f"`rl_num_generations` (={self.rl_num_generations}) must be at least 2: GRPO/DAPO advantages compare "
                "completions of the same problem."
            )
        rollout = self.rl_prompts_per_generation * self.rl_num_generations
        if rollout % self.rl_steps_per_generation:
            raise ValueError(
                f"A rollout batch of `rl_prompts_per_generation` * `rl_num_generations` (={rollout}) completions must "
                f"split evenly into `rl_steps_per_generation` (={self.rl_steps_per_generation}) mini-batches."
            )
        for name in ("sft_learning_rate", "rl_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` (={value!r}) must be a positive float.")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"`save_dtype` (={self.save_dtype!r}) must be one of {sorted(SAVE_DTYPES)}.")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"`num_threads` (={self.num_threads!r}) must be a positive integer or None.")

    @classmethod
    def quick(cls, **overrides: Any) -> ToyPairConfig:
        """A tiny build (seconds) that exercises every stage; the pair it makes is not meant to be good."""
        values: dict[str, Any] = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            sft_steps=20, sft_batch_size=16, sft_warmup_steps=2, rl_steps=2, rl_prompts_per_generation=2,
            rl_num_generations=2, rl_steps_per_generation=1, rl_train_problems=16, max_completion_length=24, eval_problems=8,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.to_dict()
        return data


@dataclass
class ToyPairResult:
    """What `build_toy_pair` made: the two folders and their held-out accuracies."""

    base_dir: str
    rl_dir: str
    accuracies: dict[str, dict[str, float]]  # {"base"|"rl": {"greedy": acc, "sampled": acc}}
    seconds: dict[str, float]  # {"sft", "rl", "eval", "total"}


# ---------------------------------------------------------------------- model and data
def make_toy_model(config: ToyPairConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised `LlamaForCausalLM` sized by `config` (seeded by the caller)."""
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = config.max_completion_length
    return model


def chat_prompt(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.prompt}]


def chat_inputs(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` of the chat prompts of `problems`, ready for `generate`."""
    texts = [tokenizer.apply_chat_template(chat_prompt(p), add_generation_prompt=True, tokenize=False) for p in problems]
    return tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")


def sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    completions: Sequence[str],
    documents: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` for SFT.

    Chats `(problem, completion)` are labelled on the completion and its `<eos>` only; plain `documents` (worked
    examples) follow `<bos>` and are labelled on every token.
    """
    rows, label_rows = [], []
    for problem, completion in zip(problems, completions, strict=True):
        prompt = tokenizer.apply_chat_template(chat_prompt(problem), add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        label_rows.append([-100] * len(prompt_ids) + completion_ids)
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        rows.append([tokenizer.bos_token_id] + ids)
        label_rows.append([-100] + ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------- stages
def train_base(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: ToyPairConfig,
    progress: ProgressFn | None = None,
) -> list[float]:
    """SFT on imperfect chat traces mixed with plain worked examples (fresh train-split problems every step).

    Returns the loss of every step.
    """
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_learning_rate, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < config.sft_warmup_steps:
            return (step + 1) / config.sft_warmup_steps
        t = (step - config.sft_warmup_steps) / max(1, config.sft_steps - config.sft_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for step in range(config.sft_steps):
        problems = sample_problems(config.sft_batch_size, seed=rng.getrandbits(32), config=config.task)
        completions = [imperfect_trace(p, rng, config.task) for p in problems]
        documents = [
            worked_example(p)
            for p in sample_problems(config.sft_documents, seed=rng.getrandbits(32), config=config.task)
        ]
        loss = model(**sft_batch(tokenizer, problems, completions, documents)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.sft_steps - 1:
            logger.info("sft step %d/%d loss %.4f", step + 1, config.sft_steps, losses[-1])
        if progress is not None:
            progress("sft", step + 1, config.sft_steps)
    model.eval()
    return losses


def _rl_trainer_class(advantage_reweighting: str, reweight_alpha: float | None) -> tuple[type, dict[str, Any]]:
    """The trainer class of `train_rl` and its extra keyword arguments: TRL's `GRPOTrainer` for "none"."""
    from ..training.config import resolve_alpha

    resolve_alpha(advantage_reweighting, reweight_alpha)  # fails fast on a bad method or alpha
    if advantage_reweighting == "none":
        if reweight_alpha is not None:
            raise ValueError(
                f"`reweight_alpha` (={reweight_alpha!r}) needs `advantage_reweighting` other than 'none', e.g. "
                "'lowprob' (the paper's Eq. 8)."
            )
        from trl import GRPOTrainer

        return GRPOTrainer, {}
    from ..training import DirectionalGRPOTrainer

    return DirectionalGRPOTrainer, {"advantage_reweighting": advantage_reweighting, "reweight_alpha": reweight_alpha}


def train_rl(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: ToyPairConfig,
    progress: ProgressFn | None = None,
    *,
    advantage_reweighting: str = "none",
    reweight_alpha: float | None = None,
    callbacks: list | None = None,
) -> list[dict[str, float]]:
    """DAPO (TRL `GRPOTrainer`) from `model` with the verifier as the only reward. Trains `model` in place.

    Args:
        advantage_reweighting (`str`, defaults to `"none"`): `"none"` trains with TRL's plain `GRPOTrainer` (how the
            shipped pair is built); `"lowprob"` (the paper's Eq. 8), `"dominate"` or `"ppl"` train with
            `hf_extrapolate.training.DirectionalGRPOTrainer` instead, which also logs `reweight/*` metrics.
        reweight_alpha (`float`, *optional*): the reweighting strength (None: the method's default, 0.2 for
            "lowprob"); only with a method other than "none".
        callbacks (`list` of `transformers.TrainerCallback`, *optional*): appended to the trainer's callbacks.

    Returns TRL's log history (reward, entropy, completions/mean_length, clip ratios, ... every 10 steps). Nothing is
    written to disk.
    """
    try:
        from datasets import Dataset
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOConfig
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The RLVR stage needs TRL and datasets: `pip install 'hf_extrapolate[train]'`.") from err
    trainer_class, reweighting = _rl_trainer_class(advantage_reweighting, reweight_alpha)

    problems = sample_problems(config.rl_train_problems, seed=config.seed + 1, config=config.task)
    dataset = Dataset.from_dict(
        {"prompt": [chat_prompt(p) for p in problems], "answer": [p.answer for p in problems]}
    )
    rollout = config.rl_prompts_per_generation * config.rl_num_generations

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress("rl", state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logger.info("rl step %d/%d reward %.3f", state.global_step, state.max_steps, logs["reward"])

    with tempfile.TemporaryDirectory(prefix="toy_pair_rl_") as scratch, warnings.catch_warnings():
        # TRL itself reads the deprecated `model.is_gradient_checkpointing`; nothing for the user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        args = GRPOConfig(
            output_dir=scratch,
            # DAPO: token-level loss over the batch, clip-higher, no KL, group-normalised verifier reward only
            loss_type="dapo",
            epsilon=0.2,
            epsilon_high=0.28,
            beta=0.0,
            scale_rewards="group",
            mask_truncated_completions=True,
            num_generations=config.rl_num_generations,
            max_completion_length=config.max_completion_length,
            temperature=1.0,
            # optimisation: one rollout batch feeds `rl_steps_per_generation` mini-batch steps
            learning_rate=config.rl_learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            per_device_train_batch_size=rollout // config.rl_steps_per_generation,
            steps_per_generation=config.rl_steps_per_generation,
            gradient_accumulation_steps=1,
            num_iterations=1,
            max_steps=config.rl_steps,
            # CPU, fp32, seeded, quiet, nothing saved (the caller saves the model)
            use_cpu=True,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,
            seed=config.seed,
            data_seed=config.seed,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = trainer_class(
            model=model,
            reward_funcs=boxed_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[_Progress(), *(callbacks or [])],
            **reweighting,
        )
        trainer.remove_callback(PrinterCallback)  # library code does not print; the logs go to `logger`
        trainer.train()
    model.config.use_cache = True  # the trainer turns the KV cache off for training
    model.eval()
    return [dict(entry) for entry in trainer.state.log_history]


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    do_sample: bool = False,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 256,
) -> list[str]:
    """Completions of `model` for `problems` with plain `model.generate`: greedy, or sampled at temperature 1.

    Sampling is seeded with `torch.manual_seed(seed)` (the global RNG is left advanced).
    """
    model.eval()
    completions: list[str] = []
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    for start in range(0, len(problems), batch_size):
        inputs = chat_inputs(tokenizer, problems[start : start + batch_size]).to(model.device)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        completions += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


def evaluate_toy_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
) -> dict[str, float]:
    """Accuracy on `problems`: `{"greedy": ..., "sampled": ...}`, sampled = mean over `samples` per problem."""
    greedy = generate_completions(model, tokenizer, problems, False, seed, max_new_tokens)
    repeated = [p for p in problems for _ in range(samples)]
    sampled = generate_completions(model, tokenizer, repeated, True, seed, max_new_tokens)
    return {"greedy": accuracy(greedy, problems), "sampled": accuracy(sampled, repeated)}


def held_out_problems(config: ToyPairConfig | None = None, n: int | None = None) -> list[Problem]:
    """The fixed held-out evaluation problems of `config` (the first `n`, default `config.eval_problems`)."""
    config = config or ToyPairConfig()
    return sample_problems(config.eval_problems if n is None else n, seed=config.eval_seed, config=config.task, split="held_out")


# ---------------------------------------------------------------------- the whole build
def _round_weights(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Round the fp32 weights to `dtype` and back, so the fp32 model evaluated is exactly the one saved."""
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).float())


def _save(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str, dtype: torch.dtype, info: dict[str, Any]
) -> None:
    os.makedirs(path, exist_ok=True)
    model.to(dtype).save_pretrained(path)
    model.float()
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, PAIR_INFO_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def build_toy_pair(
    out_dir: str | os.PathLike,
    config: ToyPairConfig | None = None,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> ToyPairResult:
    """Train the toy base model (SFT) and its RLVR model (DAPO), evaluate both, save `out_dir/{base,rl}`.

    Args:
        out_dir (`str` or `os.PathLike`): where `base/` and `rl/` are written (created; files in them overwritten).
        config (`ToyPairConfig`, *optional*): defaults to `ToyPairConfig()`; keyword `overrides` (e.g. `seed=1`)
            replace its fields.
        progress (`callable`, *optional*): called as `progress(stage, done, total)`, stage in
            {"sft", "rl", "eval"}, e.g. to drive a progress bar.

    Returns `ToyPairResult` with the folders, the held-out accuracies and the wall-clock seconds per stage.

    ```python
    >>> from hf_extrapolate.toy import build_toy_pair
    >>> result = build_toy_pair("toy_pair", seed=0)  # ~6-7 min on one CPU thread
    >>> result.accuracies["rl"]["greedy"] > result.accuracies["base"]["greedy"]
    True
    ```
    """
    config = config or ToyPairConfig()
    if overrides:
        config = ToyPairConfig(**{**config.to_dict(), **overrides})
    out_dir = os.fspath(out_dir)
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _build(out_dir, config, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out_dir: str, config: ToyPairConfig, progress: ProgressFn | None) -> ToyPairResult:
    dtype = SAVE_DTYPES[config.save_dtype]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    eval_set = held_out_problems(config)

    def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, done: int) -> dict[str, float]:
        t0 = time.perf_counter()
        result = evaluate_toy_model(
            model, tokenizer, eval_set, config.eval_samples, config.eval_seed, config.max_completion_length
        )
        seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - t0
        if progress is not None:
            progress("eval", done, 2)
        return result

    tokenizer = build_toy_tokenizer()
    torch.manual_seed(config.seed)
    model = make_toy_model(config, tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("toy model: LlamaForCausalLM, %d parameters", num_parameters)

    t0 = time.perf_counter()
    sft_losses = train_base(model, tokenizer, config, progress)
    _round_weights(model, dtype)
    seconds["sft"] = time.perf_counter() - t0
    base_accuracy = evaluate(model, tokenizer, 1)
    logger.info("base held-out accuracy: %s", base_accuracy)

    common = {
        "config": config.to_dict(),
        "model": {"class": type(model).__name__, "num_parameters": num_parameters},
        "eval": {"problems": len(eval_set), "split": "held_out", "samples_per_problem": config.eval_samples},
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
    base_dir, rl_dir = os.path.join(out_dir, "base"), os.path.join(out_dir, "rl")
    base_info = {**common, "role": "base", "accuracy": base_accuracy, "final_sft_loss": sft_losses[-1]}
    _save(model, tokenizer, base_dir, dtype, base_info)

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    log_history = train_rl(model, tokenizer, config, progress) if config.rl_steps > 0 else []
    _round_weights(model, dtype)
    seconds["rl"] = time.perf_counter() - t0
    rl_accuracy = evaluate(model, tokenizer, 2)
    seconds["total"] = time.perf_counter() - start
    logger.info("rl held-out accuracy: %s (%.0f s in all)", rl_accuracy, seconds["total"])

    write_problems_jsonl(os.path.join(out_dir, HELD_OUT_NAME), eval_set)
    rl_info = {
        **common,
        "role": "rl",
        "accuracy": rl_accuracy,
        "base_accuracy": base_accuracy,
        "rl_reward_every_10_steps": [round(e["reward"], 4) for e in log_history if "reward" in e],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    _save(model, tokenizer, rl_dir, dtype, rl_info)
    return ToyPairResult(base_dir, rl_dir, {"base": base_accuracy, "rl": rl_accuracy}, seconds)
