"""Time directional generation against the plain generate calls it is built from.

```bash
python benchmarks/bench_generate.py                          # CPU: batch 4, 32 and 128 new tokens (minutes)
python benchmarks/bench_generate.py --full --clock process   # CPU: the README table, 64 -> 512 tokens (about an hour)
python benchmarks/bench_generate.py --device cuda            # Qwen2.5-1.5B-shaped config in bf16 (`--full` too)
python benchmarks/bench_generate.py --quick --json out.json  # tiny config, seconds (the CI smoke test)
```

Rows, timed on the same prompts, interleaved within every repeat (warm-up, then the median of `--repeats`):

1. `rl`: plain `rl_model.generate` (the floor for one model);
2. `base`: plain `base_model.generate` (1 + 2 is the floor for two separate models);
   `minimal`: the least two models alternating in one loop cost, a processor that feeds the newest token to the base
   with its own cache and computes nothing (`directional_vs_minimal` is the processor's own overhead);
3. `directional`: `rl_model.generate` with a `DirectionalLogitsProcessor` on a separate base model, and
   `directional_wrapper`: the same through `DirectionalModelForCausalLM`;
4. `peft`: plain generate of a PEFT LoRA model (adapter on), `lora_fused` / `lora_fallback`: that adapter paired with
   its own base through `DirectionalModelForCausalLM.from_peft`;
5. `naive`: the reference implementation's cost shape, the base model recomputed on the full prefix at every step
   without a cache (only up to `--naive-max-tokens`).

Every row generates exactly `N` new tokens (`min_new_tokens = max_new_tokens = N`). Models are random-initialised
from configs of realistic shape (timing needs no trained weights). Peak memory is the bytes of the weights the row
uses plus the peak of torch's allocations above the level before the call: `torch.cuda.max_memory_allocated` on
GPU, the allocation events of `torch.profiler(profile_memory=True)` on CPU (one untimed greedy run per row).
`processor math` is the share of a directional step spent in the processor outside the base model's forward (an
extra, instrumented run). On CUDA the host-device synchronisations per step of the base forward and of the processor
math are counted with `torch.cuda.set_sync_debug_mode("warn")`. `--clock process` times CPU runs by this process's
CPU time instead of the wall clock: steadier on a shared host (both are in the JSON).

This script does not check outputs against each other (the test suite does) and never asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from hf_extrapolate import DirectionalLogitsProcessor, DirectionalModelForCausalLM, ExtrapolationConfig
from hf_extrapolate.cache_compat import cache_kwargs, output_cache
from hf_extrapolate.directional import directional_step

PAD, BOS, EOS = 0, 1, 2
CONFIG = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)
NEUTRAL = dict(top_k=0, top_p=1.0, temperature=1.0)
ROWS = ("rl", "base", "minimal", "directional", "directional_wrapper", "peft", "lora_fused", "lora_fallback", "naive")


@dataclasses.dataclass
class Setting:
    """What one run measures: model shape, the (batch, new tokens) grid, repeats."""

    device: str
    dtype: torch.dtype
    model: dict[str, Any]
    grid: tuple[tuple[int, int], ...]
    naive_max_tokens: int
    prompt_length: int = 32
    lora_rank: int = 16
    repeats: int = 3
    modes: tuple[str, ...] = ("greedy", "sample")
    clock: str = "wall"
    memory_max_tokens: int | None = None  # longest generation whose memory is measured (None: all)


CPU_MODEL = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=32000, tie_word_embeddings=False,
)
QWEN25_1P5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
)
SMALL_MODEL = dict(  # the second shape: a two-model step of a few ms, where per-op costs show most
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
    vocab_size=8192, tie_word_embeddings=False,
)
TINY_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1000, tie_word_embeddings=False,
)
# (batch, new tokens): a length sweep at the default batch, then a batch sweep at one length
CPU_GRID = ((4, 32), (4, 128))
CPU_FULL_GRID = ((4, 64), (4, 128), (4, 256), (4, 512), (1, 64), (8, 64))
CUDA_GRID = ((8, 64), (8, 256))
CUDA_FULL_GRID = ((8, 64), (8, 128), (8, 256), (8, 512), (1, 128), (32, 128))


def make_setting(args: argparse.Namespace) -> Setting:
    if args.quick:
        s = Setting("cpu", torch.float32, TINY_MODEL, ((2, 8), (2, 16)), 16, prompt_length=8, lora_rank=4, repeats=1)
    elif args.device == "cuda":
        grid, naive = (CUDA_FULL_GRID, 128) if args.full else (CUDA_GRID, 64)
        s = Setting("cuda", torch.bfloat16, QWEN25_1P5B, grid, naive, prompt_length=64)
    else:
        s = Setting("cpu", torch.float32, CPU_MODEL, *((CPU_FULL_GRID, 128) if args.full else (CPU_GRID, 32)),
                    memory_max_tokens=256)
    if getattr(args, "model", "default") == "small":
        s = dataclasses.replace(s, model=SMALL_MODEL)
    if args.batch or args.tokens:
        batches = args.batch or sorted({b for b, _ in s.grid})
        lengths = args.tokens or sorted({n for _, n in s.grid})
        s = dataclasses.replace(s, grid=tuple((b, n) for b in batches for n in lengths))
    overrides = {
        "repeats": args.repeats,
        "naive_max_tokens": args.naive_max_tokens,
        "memory_max_tokens": args.memory_max_tokens,
        "modes": tuple(args.modes) if args.modes else None,
        "clock": args.clock if s.device == "cpu" else "wall",
    }
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------- models and inputs
def build_model(setting: Setting, seed: int) -> Qwen2ForCausalLM:
    """A random-initialised Qwen2 causal LM of the setting's shape, in eval mode on the setting's device."""
    cfg = Qwen2Config(
        **setting.model, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(setting.dtype)
    try:
        with torch.device(setting.device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model.eval()


def build_peft(base: torch.nn.Module, setting: Setting) -> Any:
    """A LoRA adapter (random, non-zero) on every linear layer of a copy of `base`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=setting.lora_rank, lora_alpha=2 * setting.lora_rank, target_modules=targets,
                     init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), cfg).to(setting.dtype).eval()


def make_prompts(batch: int, length: int, vocab: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random left-padded prompts: row i has `length - 4 * (i % 3)` real tokens (ids >= 3, no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i in range(batch):
        n = max(1, length - 4 * (i % 3))
        ids[i, length - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, length - n:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def param_bytes(*models: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for m in models:
        for p in m.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------- the naive baseline
class NaiveRecomputeProcessor(LogitsProcessor):
    """The reference implementation's cost shape: the base model on the full prefix at every step, no cache."""

    def __init__(self, base_model: torch.nn.Module, config: ExtrapolationConfig, attention_mask: torch.Tensor,
                 greedy: bool):
        self.base_model, self.config, self.prompt_mask, self.greedy = base_model, config, attention_mask, greedy

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, length = input_ids.shape
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(rows, length - self.prompt_mask.shape[1])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        base = self.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                               logits_to_keep=1).logits[:, -1]
        return directional_step(scores, base, self.config, greedy=self.greedy)[0]


class MinimalTwoModelProcessor(LogitsProcessor):
    """The least a second model can cost inside generate: feed the newest token to the base model with its own
    cache and compute nothing (scores returned as they are). The floor the directional processor is measured
    against (`directional / minimal`)."""

    def __init__(self, base_model: torch.nn.Module, attention_mask: torch.Tensor):
        self.base_model, self.mask, self.cache, self.position = base_model, attention_mask, None, None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            out = self.base_model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                                  use_cache=True, logits_to_keep=1)
            self.position = self.mask.sum(-1, keepdim=True)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
            out = self.base_model(input_ids=input_ids[:, -1:], attention_mask=self.mask, position_ids=self.position,
                                  **cache_kwargs(self.cache), use_cache=True, logits_to_keep=1)
            self.position = self.position + 1
        self.cache = output_cache(out)
        return scores


class _Profiled(LogitsProcessor):
    """Runs `inner` inside a profiler range (the directional processor follows generate's mode also when wrapped)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function("PROCESSOR"):
            return self.inner(input_ids, scores)


def operators_per_step(rl, base, inputs: dict, n: int = 16) -> dict[str, dict[str, float]]:
    """Operators (aten calls, each at least one kernel) per step that the processor issues outside the base model's
    forward, for the `minimal` and `directional` processors, greedy and sampling (torch profiler, one run each)."""
    counts: dict[str, dict[str, float]] = {}
    ranges: list[Any] = []

    def pre(module, args, kwargs):
        ranges.append(torch.profiler.record_function("BASE_FORWARD"))
        ranges[-1].__enter__()

    def post(module, args, kwargs, output):
        ranges.pop().__exit__(None, None, None)

    handles = [base.register_forward_pre_hook(pre, with_kwargs=True),
               base.register_forward_hook(post, with_kwargs=True)]
    try:
        for mode in ("greedy", "sample"):
            counts[mode] = {}
            for name in ("minimal", "directional"):
                proc = (MinimalTwoModelProcessor(base, inputs["attention_mask"]) if name == "minimal" else
                        DirectionalLogitsProcessor(base, CONFIG))
                torch.manual_seed(0)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    rl.generate(**inputs, **gen_kwargs(n, mode == "sample"),
                                logits_processor=LogitsProcessorList([_Profiled(proc)]))
                events = prof.events()
                steps = sum(e.name == "PROCESSOR" for e in events)
                ops = sum(1 for e in events if e.cpu_parent is not None and e.cpu_parent.name == "PROCESSOR"
                          and e.name != "BASE_FORWARD")
                counts[mode][name] = ops / max(steps, 1)
    finally:
        for h in handles:
            h.remove()
    return counts


# ---------------------------------------------------------------------- rows
def make_rows(rl, base, peft_model, setting: Setting) -> dict[str, Callable[[dict, int, bool], Any]]:
    """Row name -> run(inputs, new_tokens, do_sample) returning generate's sequences."""
    fused = DirectionalModelForCausalLM.from_peft(peft_model, CONFIG, lora_strategy="fused")
    fallback = DirectionalModelForCausalLM.from_peft(peft_model, CONFIG, lora_strategy="fallback")
    wrapper = DirectionalModelForCausalLM(rl, base, CONFIG)

    def plain(model):
        def run(inputs, n, do_sample):
            return model.generate(**inputs, **gen_kwargs(n, do_sample))
        return run

    def directional(inputs, n, do_sample):
        proc = DirectionalLogitsProcessor(base, CONFIG, attention_mask=inputs["attention_mask"], do_sample=do_sample)
        return rl.generate(**inputs, **gen_kwargs(n, do_sample), logits_processor=LogitsProcessorList([proc]))

    def minimal(inputs, n, do_sample):
        proc = MinimalTwoModelProcessor(base, inputs["attention_mask"])
        return rl.generate(**inputs, **gen_kwargs(n, do_sample), logits_processor=LogitsProcessorList([proc]))

    def naive(inputs, n, do_sample):
        proc = NaiveRecomputeProcessor(base, CONFIG, inputs["attention_mask"], greedy=not do_sample)
        return rl.generate(**inputs, **gen_kwargs(n, do_sample), logits_processor=LogitsProcessorList([proc]))

    return {
        "rl": plain(rl),
        "base": plain(base),
        "minimal": minimal,
        "directional": directional,
        "directional_wrapper": plain(wrapper),
        "peft": plain(peft_model),
        "lora_fused": plain(fused),
        "lora_fallback": plain(fallback),
        "naive": naive,
    }


def gen_kwargs(n: int, do_sample: bool) -> dict[str, Any]:
    warpers = NEUTRAL if do_sample else {}
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=do_sample, **warpers, pad_token_id=PAD)


ROW_MODELS = {  # which weights a row reads, for its memory footprint
    "rl": ("rl",), "base": ("base",), "minimal": ("rl", "base"), "directional": ("rl", "base"), "directional_wrapper": ("rl", "base"),
    "peft": ("peft",), "lora_fused": ("peft",), "lora_fallback": ("peft",), "naive": ("rl", "base"),
}


# ---------------------------------------------------------------------- measurement
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(run: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, output) of `run()`, synchronised on CUDA."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def peak_extra_bytes(run: Callable[[], Any], device: str) -> int:
    """Peak of torch's allocations during `run()` above the level before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def processor_math_share(rl, base, inputs: dict, n: int, do_sample: bool, device: str) -> dict[str, float]:
    """An instrumented directional run, timed by parts (per step): the RL forward, the base forward, the processor
    outside the base forward ("math") and generate's own loop around them ("loop": input preparation, the other
    logits processors, sampling, stopping criteria).

    Two plain generate calls pay the loop twice, the directional call once but adds the math, so
    `predicted_ratio = step / (step - math + loop)` is directional / (rl + base) measured within a single run, free
    of the drift between separately timed runs.
    """
    proc = DirectionalLogitsProcessor(base, CONFIG, attention_mask=inputs["attention_mask"], do_sample=do_sample)
    totals = {"processor": 0.0, "base_forward": 0.0, "rl_forward": 0.0}
    starts: list[float] = []

    def clock(fn, key):
        def wrapped(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(device)
            totals[key] += time.perf_counter() - start
            return out
        return wrapped

    def rl_start(module, args, kwargs):
        synchronize(device)
        starts.append(time.perf_counter())

    def rl_end(module, args, kwargs, output):
        synchronize(device)
        totals["rl_forward"] += time.perf_counter() - starts.pop()

    proc.reference = _Timed(proc.reference, clock(proc.reference.__call__, "base_forward"))
    timed_proc = clock(proc, "processor")
    handles = [rl.register_forward_pre_hook(rl_start, with_kwargs=True),
               rl.register_forward_hook(rl_end, with_kwargs=True)]
    torch.manual_seed(0)
    try:
        seconds, _, _ = timed(
            lambda: rl.generate(**inputs, **gen_kwargs(n, do_sample),
                                logits_processor=LogitsProcessorList([timed_proc])),
            device,
        )
    finally:
        for h in handles:
            h.remove()
    math_s = totals["processor"] - totals["base_forward"]
    loop_s = seconds - totals["rl_forward"] - totals["processor"]
    return {
        "step_ms": 1e3 * seconds / n,
        "rl_forward_ms": 1e3 * totals["rl_forward"] / n,
        "base_forward_ms": 1e3 * totals["base_forward"] / n,
        "processor_math_ms": 1e3 * math_s / n,
        "generate_loop_ms": 1e3 * loop_s / n,
        "processor_math_share": math_s / seconds,
        "predicted_ratio": seconds / (seconds - math_s + loop_s),
    }


def outside_base_forward(rl, base, inputs: dict, n: int, do_sample: bool, device: str, repeats: int = 3
                         ) -> dict[str, float]:
    """Per step, the time the `minimal` and the `directional` processor spend outside the base model's forward
    (forward hooks on the base; the directional figure includes the base cache's bookkeeping, the step math and the
    statistics), and the minimal loop's step time; the median of `repeats` instrumented runs of each, interleaved.

    `directional_vs_minimal_from_parts = 1 + (directional - minimal) / minimal step`: what the processor adds to the
    minimal loop, read from the parts that differ, free of the forward-time drift between separately timed runs
    (which on a shared 2-core box spreads end-to-end ratios over several per cent).
    """
    from hf_extrapolate import cpu_kernel

    kernel = cpu_kernel.active()
    kinds = ("minimal", "directional", "directional_eager") if kernel is not None else ("minimal", "directional")
    outside: dict[str, list[float]] = {kind: [] for kind in kinds}
    steps: list[float] = []
    state = {"base": 0.0, "proc": 0.0, "start": 0.0}

    def pre(module, args, kwargs):
        synchronize(device)
        state["start"] = time.perf_counter()

    def post(module, args, kwargs, output):
        synchronize(device)
        state["base"] += time.perf_counter() - state["start"]

    class Clocked(LogitsProcessor):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, input_ids, scores):
            synchronize(device)
            start = time.perf_counter()
            out = self.inner(input_ids, scores)
            synchronize(device)
            state["proc"] += time.perf_counter() - start
            return out

    handles = [base.register_forward_pre_hook(pre, with_kwargs=True),
               base.register_forward_hook(post, with_kwargs=True)]
    try:
        for _ in range(repeats):
            for kind in kinds:
                cpu_kernel._module = None if kind == "directional_eager" else kernel
                if kind == "minimal":
                    proc = MinimalTwoModelProcessor(base, inputs["attention_mask"])
                else:
                    proc = DirectionalLogitsProcessor(base, CONFIG, attention_mask=inputs["attention_mask"],
                                                      do_sample=do_sample)
                state["base"] = state["proc"] = 0.0
                torch.manual_seed(0)
                wall, _, _ = timed(lambda proc=proc: rl.generate(
                    **inputs, **gen_kwargs(n, do_sample), logits_processor=LogitsProcessorList([Clocked(proc)])),
                    device)
                outside[kind].append((state["proc"] - state["base"]) / n)
                if kind == "minimal":
                    steps.append(wall / n)
    finally:
        cpu_kernel._module = kernel
        for h in handles:
            h.remove()
    minimal, directional, step = (statistics.median(v) for v in (outside["minimal"], outside["directional"], steps))
    result = {
        "minimal_outside_base_ms": 1e3 * minimal,
        "directional_outside_base_ms": 1e3 * directional,
        "minimal_step_ms": 1e3 * step,
        "directional_vs_minimal_from_parts": 1.0 + (directional - minimal) / step,
    }
    if kernel is not None:  # the eager step in the same run, interleaved
        eager = statistics.median(outside["directional_eager"])
        result["directional_eager_outside_base_ms"] = 1e3 * eager
        result["directional_eager_vs_minimal_from_parts"] = 1.0 + (eager - minimal) / step
    return result


def count_cuda_syncs(base, inputs: dict, steps: int = 16) -> dict[str, Any]:
    """Host-device synchronisations per decoding step, counted with `torch.cuda.set_sync_debug_mode("warn")`:
    of the base model's cached forward (`ReferenceModel`, which includes transformers' own forward), and of the
    processor outside it (the step distribution and the statistics, fed fixed base logits)."""
    import warnings

    from hf_extrapolate.reference import ReferenceModel, ReferencePolicy

    class Fixed(ReferencePolicy):
        def __init__(self, logits):
            self.model, self.logits = base, logits

        def __call__(self, input_ids):
            self.started_generation, self.ids = input_ids.shape[1] == inputs["input_ids"].shape[1], input_ids
            return self.logits

        def reset(self, attention_mask=None):
            pass

    ids = inputs["input_ids"]
    rows = ids.shape[0]
    reference = ReferenceModel(base, inputs["attention_mask"])
    logits = reference(ids)
    grow = torch.randint(3, 100, (rows, steps), device=ids.device)
    scores = torch.randn_like(logits)
    counts = {}
    for name in ("reference_forward", "processor_math_sample", "processor_math_greedy"):
        proc = None if name == "reference_forward" else DirectionalLogitsProcessor(
            Fixed(logits), CONFIG, do_sample=name.endswith("sample"), eos_token_id=EOS)
        if proc is not None:
            proc(ids, scores)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for t in range(1, steps):
                    step_ids = torch.cat([ids, grow[:, :t]], dim=1)
                    reference(step_ids) if proc is None else proc(step_ids, scores)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[f"{name}_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught) / (steps - 1)
    return counts


class _Timed:
    """A reference policy whose call is timed; every other attribute is the wrapped one's."""

    def __init__(self, inner, call):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def run_grid(
    setting: Setting, rows_wanted: tuple[str, ...], log: Callable[[str], None],
    checkpoint: Callable[[dict], None] = lambda report: None,
) -> dict[str, Any]:
    rl = build_model(setting, seed=0)
    base = build_model(setting, seed=1)
    peft_model = build_peft(base, setting)
    weights = {"rl": param_bytes(rl), "base": param_bytes(base), "peft": param_bytes(peft_model)}
    runs = make_rows(rl, base, peft_model, setting)
    vocab = setting.model["vocab_size"]
    results, summaries, math_rows = [], [], []

    def call(name: str, inputs: dict, n: int, do_sample: bool) -> Any:
        torch.manual_seed(0)
        return runs[name](inputs, n, do_sample)

    with torch.inference_mode():
        warm = make_prompts(setting.grid[0][0], setting.prompt_length, vocab, setting.device)
        for name in rows_wanted:  # one warm-up per row and mode (first-call costs), untimed
            for mode in setting.modes:
                call(name, warm, 4, mode == "sample")
        for batch, n in setting.grid:
            inputs = make_prompts(batch, setting.prompt_length, vocab, setting.device)
            names = [r for r in rows_wanted if r != "naive" or n <= setting.naive_max_tokens]
            # memory: one untimed greedy run per row (the profiler slows it down); sampling differs by (B, V) buffers
            # (the CPU profiler keeps every op event: some 5 GB for 8 rows x 256 tokens, hence memory_max_tokens)
            measure = setting.memory_max_tokens is None or n <= setting.memory_max_tokens
            peaks = {name: peak_extra_bytes(functools.partial(call, name, inputs, n, False), setting.device)
                     if measure else None for name in names}
            for mode in setting.modes:
                do_sample = mode == "sample"
                wall: dict[str, list[float]] = {r: [] for r in names}
                cpu: dict[str, list[float]] = {r: [] for r in names}
                for rep in range(setting.repeats):
                    order = names[rep % len(names):] + names[: rep % len(names)]  # rotate to spread drift
                    for name in order:
                        w, c, out = timed(functools.partial(call, name, inputs, n, do_sample), setting.device)
                        expected = (batch, setting.prompt_length + n)
                        if tuple(out.shape) != expected:
                            raise RuntimeError(f"{name} generated {tuple(out.shape)}, expected {expected}")
                        wall[name].append(w)
                        cpu[name].append(c)
                share = (
                    processor_math_share(rl, base, inputs, n, do_sample, setting.device)
                    if "directional" in names else None
                )
                if share is not None and "minimal" in names:
                    share.update(outside_base_forward(rl, base, inputs, n, do_sample, setting.device))
                chosen = cpu if setting.clock == "process" else wall
                median = {r: statistics.median(t) for r, t in chosen.items()}
                block = []
                for name in names:
                    block.append({
                        "batch": batch, "new_tokens": n, "mode": mode, "row": name,
                        "seconds": median[name],
                        "wall_seconds": wall[name], "process_seconds": cpu[name],
                        "tokens_per_s": batch * n / median[name],
                        "ratio_to_rl": median[name] / median["rl"] if "rl" in median else None,
                        "peak_memory_mb": None if peaks[name] is None else
                        (sum(weights[m] for m in ROW_MODELS[name]) + peaks[name]) / 2**20,
                        "peak_extra_memory_mb": None if peaks[name] is None else peaks[name] / 2**20,
                    })
                summary: dict[str, Any] = {"batch": batch, "new_tokens": n, "mode": mode}
                if {"rl", "base"} <= median.keys():
                    wall_median = {r: statistics.median(t) for r, t in wall.items()}
                    for name in ("directional", "directional_wrapper", "naive"):
                        if name in median:
                            summary[f"{name}_vs_rl_plus_base"] = median[name] / (median["rl"] + median["base"])
                            summary[f"{name}_vs_rl_plus_base_paired"] = statistics.median(  # per repeat
                                d / (a + b) for d, a, b in zip(chosen[name], chosen["rl"], chosen["base"])
                            )
                            summary[f"{name}_vs_rl_plus_base_wall"] = wall_median[name] / (
                                wall_median["rl"] + wall_median["base"]
                            )
                if "minimal" in median:
                    for name in ("directional", "directional_wrapper"):
                        if name in median:
                            summary[f"{name}_vs_minimal"] = median[name] / median["minimal"]
                            summary[f"{name}_vs_minimal_paired"] = statistics.median(
                                d / m for d, m in zip(chosen[name], chosen["minimal"])
                            )
                if "peft" in median:
                    for name in ("lora_fused", "lora_fallback"):
                        if name in median:
                            summary[f"{name}_vs_peft"] = median[name] / median["peft"]
                            if measure:
                                summary[f"{name}_memory_vs_peft"] = (weights["peft"] + peaks[name]) / (
                                    weights["peft"] + peaks["peft"]
                                )
                if share is not None:
                    math_rows.append({"batch": batch, "new_tokens": n, "mode": mode, **share})
                    summary["directional_vs_rl_plus_base_predicted"] = share["predicted_ratio"]
                    if "directional_vs_minimal_from_parts" in share:
                        summary["directional_vs_minimal_from_parts"] = share["directional_vs_minimal_from_parts"]
                    if "directional_eager_vs_minimal_from_parts" in share:
                        summary["directional_eager_vs_minimal_from_parts"] = share[
                            "directional_eager_vs_minimal_from_parts"]
                results += block
                summaries.append(summary)
                log(format_block(block, summary, share))
                checkpoint({"results": results, "summary": summaries, "processor_math": math_rows})
        operators = None
        if {"minimal", "directional"} <= set(rows_wanted):
            inputs = make_prompts(setting.grid[0][0], setting.prompt_length, vocab, setting.device)
            operators = operators_per_step(rl, base, inputs)
            log(f"operators per step outside the base forward (batch {setting.grid[0][0]}): {operators}")
        syncs = None
        if setting.device == "cuda":
            inputs = make_prompts(setting.grid[0][0], setting.prompt_length, vocab, setting.device)
            try:
                syncs = count_cuda_syncs(base, inputs)
            except Exception as err:  # a diagnostic: never lose the timings for it
                syncs = {"error": repr(err)}
            log(f"host-device synchronisations per step: {syncs}")
    return {
        "results": results, "summary": summaries, "processor_math": math_rows, "cuda_syncs": syncs,
        "operators_per_step": operators,
        "weights_mb": {k: v / 2**20 for k, v in weights.items()},
    }


def format_block(rows: list[dict], summary: dict, share: dict | None) -> str:
    head = f"batch {summary['batch']}, {summary['new_tokens']} new tokens, {summary['mode']}"
    lines = [head, f"  {'row':<20}{'s':>9}{'tok/s':>10}{'x rl':>8}{'peak MB':>10}"]
    for r in rows:
        ratio = f"{r['ratio_to_rl']:.2f}" if r["ratio_to_rl"] is not None else "-"
        lines.append(
            f"  {r['row']:<20}{r['seconds']:>9.3f}{r['tokens_per_s']:>10.1f}{ratio:>8}"
            + (f"{r['peak_memory_mb']:>10.1f}" if r["peak_memory_mb"] is not None else f"{'-':>10}")
        )
    extras = [f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float)]
    if share is not None:
        extras.append(f"processor_math={100 * share['processor_math_share']:.1f}% of a step")
    lines.append("  " + ", ".join(extras))
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    """The README tables: throughput per row (x the RL model's time), then the targets' ratios."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        by_key.setdefault((r["batch"], r["new_tokens"], r["mode"]), {})[r["row"]] = r
    sums = {(s["batch"], s["new_tokens"], s["mode"]): s for s in report["summary"]}
    maths = {(m["batch"], m["new_tokens"], m["mode"]): m for m in report["processor_math"]}
    cols = [r for r in ROWS if any(r in v for v in by_key.values())]

    def table(header: list[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(cells) + " |" for cells in body]

    def fmt(value: Any, pattern: str = "{:.2f}") -> str:
        return "-" if value is None else pattern.format(value)

    speed = []
    for key, rows in by_key.items():
        speed.append([str(key[0]), str(key[1]), key[2]] + [
            "-" if rows.get(c) is None else f"{rows[c]['tokens_per_s']:.0f} ({fmt(rows[c]['ratio_to_rl'])})"
            for c in cols])
    ratios = []
    for key in by_key:
        s, m = sums.get(key, {}), maths.get(key)
        ratios.append([str(key[0]), str(key[1]), key[2],
                       fmt(s.get("directional_vs_rl_plus_base")), fmt(s.get("directional_vs_rl_plus_base_paired")),
                       fmt(s.get("directional_vs_minimal_paired"), "{:.3f}"),
                       fmt(s.get("directional_vs_minimal_from_parts"), "{:.3f}"),
                       fmt(s.get("directional_vs_rl_plus_base_predicted"), "{:.3f}"),
                       fmt(m["processor_math_share"] * 100 if m else None, "{:.1f}%"),
                       fmt(s.get("lora_fused_vs_peft")), fmt(s.get("lora_fallback_vs_peft")),
                       fmt(s.get("lora_fused_memory_vs_peft")), fmt(s.get("naive_vs_rl_plus_base"))])
    lines = table(["batch", "tokens", "mode"] + [f"{c} tok/s (x rl)" for c in cols], speed)
    lines += [""] + table(
        ["batch", "tokens", "mode", "dir / (rl+base)", "paired", "dir / minimal", "dir / minimal (parts)", "predicted",
         "processor math",
         "fused / peft",
         "fallback / peft", "fused peak mem / peft", "naive / (rl+base)"], ratios)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny config, two short lengths, one repeat (seconds)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    parser.add_argument("--full", action="store_true", help="the README grid: 64 -> 512 tokens, batch 1 / 4 / 8")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (grid = batches x tokens)")
    parser.add_argument("--tokens", type=int, nargs="+", help="new-token counts (grid = batches x tokens)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="CPU only: time by wall clock or by this process's CPU time (steadier on a shared host)")
    parser.add_argument("--repeats", type=int, help="timed repeats per row (median reported)")
    parser.add_argument("--naive-max-tokens", type=int, help="longest generation the naive row runs for")
    parser.add_argument("--memory-max-tokens", type=int,
                        help="longest generation whose peak memory is measured (CPU default 256: the profiler is heavy)")
    parser.add_argument("--modes", nargs="+", choices=("greedy", "sample"))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--model", choices=("default", "small"), default="default",
                        help="CPU model shape: default hidden 512 / 8 layers / vocab 32000; small hidden 256 / 4 / 8192")
    parser.add_argument("--cpu-kernel", action="store_true",
                        help="run the directional rows through the compiled CPU step (hf_extrapolate.cpu_kernel); "
                             "the parts measurement then also times the eager step, interleaved")
    args = parser.parse_args(argv)
    if args.cpu_kernel:
        from hf_extrapolate import cpu_kernel

        cpu_kernel.enable()
    if args.device == "cuda" and args.quick:
        parser.error("--quick is a CPU smoke test; drop --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    setting = make_setting(args)
    if setting.device == "cpu":
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "date": started.date().isoformat(),
        "device": setting.device,
        "device_name": torch.cuda.get_device_name() if setting.device == "cuda" else platform.processor() or
        platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_kernel": bool(args.cpu_kernel),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dtype": str(setting.dtype),
        "model": setting.model,
        "prompt_length": setting.prompt_length,
        "lora_rank": setting.lora_rank,
        "repeats": setting.repeats,
        "clock": setting.clock,
        "grid": setting.grid,
        "extrapolation_config": CONFIG.to_dict(),
    }

    def write(report: dict, complete: bool) -> None:
        if not args.json:
            return
        meta.update(
            complete=complete,
            load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
            seconds_total=(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        )
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**report, "meta": meta}, f, indent=2)
            f.write("\n")

    report = run_grid(
        setting, tuple(r for r in ROWS if r in args.rows), lambda s: print(s, flush=True),
        checkpoint=lambda partial: write(partial, complete=False),  # a long run keeps what it measured
    )
    write(report, complete=True)
    report["meta"] = meta
    print(markdown_table(report))
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
