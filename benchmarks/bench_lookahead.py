"""Time lookahead decoding (`generate(..., lookahead=k)`) against step-by-step directional decoding and plain generate.

```bash
PYTHONPATH=. python benchmarks/bench_lookahead.py --json lookahead.json   # CPU, 1 thread: about 15 minutes on a shared 2-core box
PYTHONPATH=. python benchmarks/bench_lookahead.py --quick                 # tiny config, seconds (a smoke run)
```

Rows, interleaved within every repeat on the same prompts (one warm-up, then the median of `--repeats`), all sampling
(`do_sample=True`, neutral warpers), every row generating exactly N new tokens (EOS disabled):

1. `targets`: at 5% redraws (`criterion="random", threshold=0.05`: the rate is exact, RL proposing), at batch 1 and 4:
   plain `rl_model.generate` (`rl`), step-by-step directional generation (`step`), `lookahead=8` (`la8`) and
   `lookahead="auto"` (`laauto`, k chosen per round);
2. `curve`: `lookahead=k` for k in {2, 4, 8, 16, "auto"} over redraw rates 1%, 5%, 20%, each relative to `step` at
   the same rate (batch 1 and 4);
3. `toy`: the built-in toy pair (`hf_extrapolate.toy`) at the paper's operating point (`logp_diff`, tau = -0.3,
   gamma 0.1), both proposals, on its chat prompts (EOS on), `step` vs `lookahead=8` and `lookahead="auto"`; it
   reports the measured redraw rate and the accepted tokens per round.

Models for 1-2 are random-initialised Qwen2 of the shape of `bench_generate.py`'s CPU rows (hidden 512, 8 layers,
vocab 32000, fp32). Times are process CPU seconds (`time.process_time`, steadier on a shared host than the wall clock;
both are in the JSON). This script does not check outputs (tests/test_lookahead.py does) and never asserts speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_generate import make_prompts  # the same prompts as the step-by-step benchmark (run from benchmarks/)
from transformers import Qwen2Config, Qwen2ForCausalLM

from hf_extrapolate import DirectionalModelForCausalLM, ExtrapolationConfig

PAD, BOS, EOS = 0, 1, 2
CPU_MODEL = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=32000, tie_word_embeddings=False,
)
TINY_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1000, tie_word_embeddings=False,
)
NEUTRAL = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)


def build_model(shape: dict, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def timed(run: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median process / wall seconds of every run, the runs interleaved within each repeat after one warm-up. Every
    run of repeat i starts from torch seed 1000 + i (the warm-up from 999): a rerun sees the same draws, and so the
    same number of lookahead rounds (fixed k)."""
    for run in runs.values():
        torch.manual_seed(999)
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            torch.manual_seed(1000 + i)
            samples[name].append(timed(run))
    return {
        name: {"cpu_s": statistics.median(s[0] for s in vals), "wall_s": statistics.median(s[1] for s in vals)}
        for name, vals in samples.items()
    }


def random_rows(rl, base, batch: int, tokens: int, rate: float, ks: tuple[int | str, ...], repeats: int,
                prompt_len: int, with_plain: bool) -> dict[str, Any]:
    cfg = ExtrapolationConfig(criterion="random", threshold=rate, proposal="rl", gamma=0.1)
    model = DirectionalModelForCausalLM(rl, base, cfg)
    inputs = make_prompts(batch, prompt_len, rl.config.vocab_size, "cpu")
    fixed = dict(max_new_tokens=tokens, eos_token_id=None, pad_token_id=PAD, **NEUTRAL)
    runs: dict[str, Callable[[], Any]] = {}
    if with_plain:
        runs["rl"] = lambda: rl.generate(**inputs, min_new_tokens=tokens, **fixed)
    runs["step"] = lambda: model.generate(**inputs, **fixed)
    stats = {}
    for k in ks:
        def run(k=k):
            out = model.generate(**inputs, **fixed, lookahead=k)
            stats[f"la{k}"] = dict(model.last_lookahead_stats)
            return out
        runs[f"la{k}"] = run
    times = interleaved(runs, repeats)
    row: dict[str, Any] = {"batch": batch, "tokens": tokens, "rate": rate, "times": times, "lookahead_stats": stats}
    row["vs_step"] = {k: times[k]["cpu_s"] / times["step"]["cpu_s"] for k in times if k.startswith("la")}
    if with_plain:
        row["vs_rl"] = {k: times[k]["cpu_s"] / times["rl"]["cpu_s"] for k in times if k != "rl"}
    return row


def toy_rows(tokens: int, repeats: int, batch: int) -> list[dict[str, Any]]:
    from hf_extrapolate.toy import load_toy_pair, sample_problems
    from hf_extrapolate.toy.train import chat_inputs

    rl, base, tok = load_toy_pair()
    inputs = dict(chat_inputs(tok, sample_problems(batch, seed=7, split="held_out")))
    out = []
    for proposal in ("base", "rl"):
        cfg = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1, proposal=proposal)
        model = DirectionalModelForCausalLM(rl, base, cfg)
        fixed = dict(max_new_tokens=tokens, **NEUTRAL)
        ratios = {}
        stats = {}

        def step(model=model, fixed=fixed, ratios=ratios):
            model.generate(**inputs, **fixed)
            ratios["step"] = float(model.last_replace_ratio.mean())

        def la(k, model=model, fixed=fixed, ratios=ratios, stats=stats):
            model.generate(**inputs, **fixed, lookahead=k)
            ratios[f"la{k}"] = float(model.last_replace_ratio.mean())
            stats[f"la{k}"] = dict(model.last_lookahead_stats)

        times = interleaved({"step": step, "la8": lambda: la(8), "laauto": lambda: la("auto")}, repeats)
        out.append({"proposal": proposal, "batch": batch, "tokens": tokens, "times": times,
                    "vs_step": {name: times[name]["cpu_s"] / times["step"]["cpu_s"] for name in ("la8", "laauto")},
                    "replace_ratio": ratios, "lookahead_stats": stats,
                    "accepted_per_round": {name: st["accepted"] / max(1, st["rounds"]) / batch
                                           for name, st in stats.items()}})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few tokens (seconds)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["targets", "curve", "toy"])
    parser.add_argument("--curve-batches", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = TINY_MODEL if args.quick else CPU_MODEL
    tokens = 16 if args.quick else args.tokens
    repeats = 1 if args.quick else args.repeats
    rl, base = build_model(shape, 0), build_model(shape, 1)
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "model": shape, "tokens": tokens,
            "repeats": repeats, "clock": "process",
        },
        "targets": [], "curve": [], "toy": [],
    }

    def show(row):
        print(json.dumps(row, default=float), flush=True)

    if "targets" not in args.skip:
        for batch in (1, 4):
            row = random_rows(rl, base, batch, tokens, 0.05, (8, "auto"), repeats, 32, with_plain=True)
            report["targets"].append(row)
            show(row)
    if "curve" not in args.skip:
        for batch in args.curve_batches:
            for rate in (0.01, 0.05, 0.20):
                row = random_rows(rl, base, batch, tokens, rate, (2, 4, 8, 16, "auto"), repeats, 32, with_plain=False)
                report["curve"].append(row)
                show(row)
    if "toy" not in args.skip:
        for row in toy_rows(24 if args.quick else 128, repeats, 4):
            report["toy"].append(row)
            show(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=float)
    return report


if __name__ == "__main__":
    main()
