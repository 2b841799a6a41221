"""Evaluation runs: every mode on the same prompts and seeds, answers checked, results resumable and data-parallel.

The work is cut into *units* = (mode, batch of `batch_size` problems of one data set). A unit is seeded from
(seed, data set, batch index) only, so that every mode sees the same random numbers for the same problems, and a
problem's samples do not depend on which other data sets, modes or processes take part in the run. Units are dealt
round-robin to the processes of an `accelerate` launch (`state.process_index` / `state.num_processes`); each process
appends its records as it goes and the main process merges them at the end (`hf_extrapolate.evaluation.results`).

A resumed run skips units whose records are all in the output already and regenerates the others whole (same seed,
same batch, so the same samples), writing only the missing records. Records made with other settings are an error.

Responses come from an *engine*: `TransformersEngine` (the two models' `generate`, one unit at a time: the default)
or `hf_extrapolate.vllm.evaluation.VllmEngine` (one vLLM engine serving every mode of a batch in one call, each mode
a per-request config). The records do not depend on the engine's batching; they name the engine (`engine`), and a
run resumes only with the engine that began it (the two draw different random numbers from the same seeds).

This module does not print or draw progress bars: pass `progress(done, total)` (the command line wires tqdm to it).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .answers import SCORERS, is_correct
from .data import Problem
from .generation import (
    GenerationSettings,
    Responses,
    TransformersEngine,
    UnitRequest,
    eos_token_ids,
    tokenize_prompts,
)
from .modes import EvalMode
from .prompts import build_prompt
from .results import (
    RecordKey,
    append_records,
    merge_results,
    part_files,
    part_path,
    read_records,
    record_key,
    repair_tail,
)

logger = logging.getLogger(__name__)


class SingleProcess:
    """The process state of a run without `accelerate launch` (duck-types `accelerate.PartialState`)."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        return None


def batch_seed(seed: int, dataset: str, batch_index: int) -> int:
    """The torch seed of batch `batch_index` of `dataset` (the same in every mode)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(dataset.encode("utf-8")), batch_index]).generate_state(1)[0])


def make_batches(problems: Sequence[Problem], batch_size: int) -> list[tuple[str, int, list[Problem]]]:
    """`(dataset, batch index within it, problems)`: consecutive problems of each data set, `batch_size` at a time."""
    by_dataset: dict[str, list[Problem]] = {}
    for problem in problems:
        by_dataset.setdefault(problem.dataset, []).append(problem)
    return [
        (dataset, start // batch_size, items[start : start + batch_size])
        for dataset, items in by_dataset.items()
        for start in range(0, len(items), batch_size)
    ]


# record fields added later, with the value a record written before them stands for
_FIELD_DEFAULTS = {"scorer": "lenient", "eos_token_id": None, "engine": "transformers"}


def _check_compatible(existing: dict[RecordKey, dict[str, Any]], expected: dict[RecordKey, dict[str, Any]], output) -> None:
    for key, fields in expected.items():
        old = existing.get(key)
        if old is None:
            continue
        for name, value in fields.items():
            if old.get(name, _FIELD_DEFAULTS.get(name)) != value:
                raise ValueError(
                    f"{output} already holds a record for {key} made with {name}={old.get(name)!r}, but this run uses "
                    f"{name}={value!r}. A run resumes only with the same settings: pass another output file, or "
                    "overwrite=True (--overwrite) to start again."
                )


def _records_for(
    responses: Responses, batch: list[Problem], mode: EvalMode, settings: GenerationSettings, tokenizer: Any,
    eos: list[int], run_fields: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    run_fields = run_fields if run_fields is not None else {"scorer": "lenient", "eos_token_id": None}
    extract = SCORERS[run_fields["scorer"]]
    k = settings.num_samples
    sequences = responses.sequences.cpu()
    lengths = responses.lengths.cpu().tolist()
    ratios = responses.replace_ratio.float().cpu().tolist()
    eos_ids = torch.tensor(eos, dtype=torch.long)
    records = []
    for row in range(sequences.shape[0]):
        problem, sample = batch[row // k], row % k
        response = sequences[row, responses.prompt_length : responses.prompt_length + lengths[row]]
        text = tokenizer.decode(response.tolist(), skip_special_tokens=True)
        extracted = extract(text)
        record = {
            "mode": mode.name,
            "dataset": problem.dataset,
            "problem_id": problem.problem_id,
            "sample": sample,
            "correct": is_correct(extracted, problem.answer),
            "extracted": extracted,
            "answer": problem.answer,
            "length": int(lengths[row]),
            "finished": bool(torch.isin(response, eos_ids).any()) if eos else False,
            "replace_ratio": float(ratios[row]),
            "text": text,
        }
        record.update({name: value for name, value in mode.fields().items() if name != "mode"})
        record.update(settings.record_fields())
        record.update(run_fields)
        records.append(record)
    return records


def _calls(todo: list, together: bool) -> list[list]:
    """The units of each engine call: one at a time, or (`together`) every pending mode of one batch of problems."""
    if not together:
        return [[unit] for unit in todo]
    calls: dict[tuple[str, int], list] = {}
    for mode, batch in todo:
        calls.setdefault((batch[0], batch[1]), []).append((mode, batch))
    return list(calls.values())


def evaluate(
    rl_model: Any,
    base_model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    modes: Sequence[EvalMode],
    settings: GenerationSettings | None = None,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = True,
    state: Any = None,
    progress: Callable[[int, int], None] | None = None,
    scorer: str = "lenient",
    eos_token_id: Sequence[int] | None = None,
    engine: Any = None,
) -> list[dict[str, Any]]:
    """Sample every problem `settings.num_samples` times in every mode and check the answers.

    Args:
        rl_model, base_model: the RL-tuned model and its base, sharing the tokenizer.
        tokenizer: the tokenizer (its chat template is used when `settings.chat_template`).
        problems: from `load_problems` / `load_datasets`.
        modes: `EvalMode`s with unique names, e.g. `[EvalMode.base(), EvalMode.rl(), EvalMode.replace()]`.
        settings (`GenerationSettings`, *optional*): sampling, batching and seeding.
        output (`str` or `PathLike`, *optional*): the JSON Lines result file (required with several processes).
        resume (`bool`, defaults to `True`): keep the records already in `output` and generate only the rest;
            `False` deletes `output` first.
        state (*optional*): an `accelerate.PartialState` for data parallelism; None runs in this process only.
        progress (*optional*): called as `progress(done, total)` after each unit this process generates.
        scorer (`str`, defaults to `"lenient"`): how the final answer is read: `"lenient"` (`extract_boxed`: the
            last complete `\\boxed{}`) or `"strict"` (`extract_boxed_strict`: only the text after the last
            `\\boxed`, the paper's reference rule).
        eos_token_id (*optional*): the ids that end a response, instead of the union of the tokenizer's and the
            models' end-of-sequence ids.
        engine (*optional*): what generates: None is `TransformersEngine(rl_model, base_model)`; pass
            `hf_extrapolate.vllm.evaluation.VllmEngine(...)` (with `rl_model = base_model = None`) to run on vLLM.

    Returns:
        The records of all modes and problems, in canonical order (mode, data set, problem, sample): dicts with
        `mode, dataset, problem_id, sample, correct, extracted, answer, length, finished, replace_ratio, text`, the
        mode's `kind, criterion, threshold, gamma, proposal`, the sampling settings, `scorer`, `eos_token_id` and
        `engine`.

    Example:

    ```python
    >>> from hf_extrapolate.evaluation import EvalMode, GenerationSettings, evaluate, load_problems, summarize
    >>> problems = load_problems("examples/data/aime24.jsonl")
    >>> records = evaluate(rl_model, base_model, tokenizer, problems, [EvalMode.base(), EvalMode.rl(),
    ...                    EvalMode.replace("logp_diff", -0.3)], GenerationSettings(num_samples=4), output="aime.jsonl")
    >>> summarize(records)  # Avg@4, Pass@1/2/4, mean length and replacement ratio per mode
    ```
    """
    settings = settings if settings is not None else GenerationSettings()
    state = state if state is not None else SingleProcess()
    if scorer not in SCORERS:
        raise ValueError(f"`scorer` (={scorer!r}) must be one of {sorted(SCORERS)}: 'lenient' reads the last complete "
                         "\\boxed{}, 'strict' only the text after the last \\boxed (the paper's reference rule).")
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"`eos_token_id` (={eos_token_id!r}) must be a token id or a non-empty list of token "
                             "ids (non-negative integers), or None for the tokenizer's and models' own.")
        eos_token_id = ids
    if engine is None:
        if rl_model is None or base_model is None:
            raise ValueError("`rl_model` and `base_model` are required unless an `engine` generates (e.g. VllmEngine).")
        engine = TransformersEngine(rl_model, base_model)
    elif rl_model is not None or base_model is not None:
        raise ValueError(f"Pass either the models or an `engine` ({engine.name}), not both: the engine holds its models.")
    run_fields = {"scorer": scorer, "eos_token_id": eos_token_id, "engine": engine.name}
    problems, modes = list(problems), list(modes)
    if not problems:
        raise ValueError("`problems` is empty; load some with load_problems(path).")
    if not modes:
        raise ValueError("`modes` is empty; pass e.g. [EvalMode.base(), EvalMode.rl()].")
    names = [mode.name for mode in modes]
    if len(set(names)) != len(names):
        raise ValueError(f"Mode names must be unique, got {names}; give EvalMode(name=...) distinct names.")
    engine.check(modes, settings)
    if state.num_processes > 1 and output is None:
        raise ValueError("A data-parallel run (accelerate launch) needs `output`: processes merge through the file.")
    rank, world = state.process_index, state.num_processes

    if output is not None and not resume:
        if state.is_main_process:
            for path in part_files(output):
                path.unlink()
        state.wait_for_everyone()

    batches = make_batches(problems, settings.batch_size)
    units = [(mode, batch) for mode in modes for batch in batches]
    canonical: dict[RecordKey, int] = {}
    expected: dict[RecordKey, dict[str, Any]] = {}
    for mode, (_, _, items) in units:
        fields = {name: value for name, value in mode.fields().items() if name != "mode"}
        fields.update(settings.record_fields())
        fields.update(run_fields)
        for problem in items:
            fields_p = dict(fields, answer=problem.answer)
            for sample in range(settings.num_samples):
                key = (mode.name, problem.dataset, problem.problem_id, sample)
                canonical[key] = len(canonical)
                expected[key] = fields_p

    existing: dict[RecordKey, dict[str, Any]] = {}
    if output is not None:
        for path in part_files(output):
            for record in read_records(path):
                existing.setdefault(record_key(record), record)
        _check_compatible(existing, expected, output)
        state.wait_for_everyone()  # every process has read the files before any of them appends

    mine = [u for i, u in enumerate(units) if i % world == rank]
    todo = [
        (mode, batch) for mode, batch in mine
        if any((mode.name, p.dataset, p.problem_id, s) not in existing
               for p in batch[2] for s in range(settings.num_samples))
    ]
    logger.info("process %d/%d: %d of its %d units to generate (%d records already done)", rank, world, len(todo),
                len(mine), len(existing))

    eos = list(eos_token_id) if eos_token_id is not None else eos_token_ids(tokenizer, *engine.eos_sources)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    prompts = {
        (p.dataset, p.problem_id): build_prompt(p.problem, tokenizer, chat_template=settings.chat_template)
        for p in problems
    }
    own_file = part_path(output, rank) if output is not None else None
    if own_file is not None:
        own_file.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(own_file)
    fresh: list[dict[str, Any]] = []
    if progress is not None:
        progress(0, len(todo))
    done = 0
    for group in _calls(todo, engine.serves_modes_together):
        requests = [
            UnitRequest(mode, tokenize_prompts(tokenizer, [prompts[(p.dataset, p.problem_id)] for p in items],
                                               chat_template=settings.chat_template),
                        batch_seed(settings.seed, dataset, batch_index))
            for mode, (dataset, batch_index, items) in group
        ]
        outputs = engine.generate(requests, settings, eos_token_id=eos, pad_token_id=pad)
        for (mode, (dataset, batch_index, items)), responses in zip(group, outputs):
            records = [r for r in _records_for(responses, items, mode, settings, tokenizer, eos, run_fields)
                       if record_key(r) not in existing]
            if own_file is not None:
                append_records(own_file, records)
            fresh.extend(records)
            logger.info("%s %s batch %d: %d records", mode.name, dataset, batch_index, len(records))
            done += 1
            if progress is not None:
                progress(done, len(todo))

    if output is None:
        return sorted(fresh, key=lambda r: canonical[record_key(r)])
    state.wait_for_everyone()
    if state.is_main_process:
        merge_results(output, order=canonical.get)
    state.wait_for_everyone()
    return [r for r in read_records(Path(output)) if record_key(r) in canonical]
