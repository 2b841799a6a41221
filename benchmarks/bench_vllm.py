"""Throughput of directional decoding inside vLLM (`hf_extrapolate.vllm.DirectionalLLM`).

Same prompts, same random-initialised Llama pair (saved to a temporary folder), every row generates exactly N tokens
(`ignore_eos`), sampling at T = 1.0, top-p 0.7 (`--top-p`). Modes (`--modes`), each timed once per N after a warm-up call:

- `plain`: vLLM's `LLM` on the RL model alone (the floor a two-model method is compared with);
- `directional`: `DirectionalLLM` (both models in vLLM's paged KV cache, one forward of each per step);
- `reference_v0`: the cost shape of the paper's reference code, written here: two engines (RL and base), one request
  per row *per token* with the whole prefix (`max_tokens=1`, top-50 log-probs), the step combined in numpy on the
  top-50 lists (missing entries padded with the list's minimum) and the token appended on the client. Prefix caching
  off: the reference ran on vLLM's V0 offline engine, whose `enable_prefix_caching` defaulted to False, so every
  call recomputes the whole prefix (quadratic in length). This is the shape the issue's target is read against;
- `reference_v1`: the same with prefix caching on (vLLM V1's default today): the re-sent prefix is found in the
  cache, so each call costs one engine round trip and a one-token prefill per engine.

Lengths past `--reference-max-tokens` are not run in full for `reference_v0` (hours on a CPU at a paper-like batch)
but estimated (`reference_v0_estimated_*`): with prefix caching off a step's cost depends only on the current prefix
length, so `--probe-steps` steps are timed at each of `--probe-points` evenly spaced prefix lengths and the per-step
time is integrated over the run (trapezoid rule). `--validate-estimate` also estimates the lengths that are run in
full and records the estimate's relative error beside the measured time.

Run: `python benchmarks/bench_vllm.py --tokens 256 1024 --json out.json` in the [vllm] environment
(`VLLM_CPU_KVCACHE_SPACE=1` on CPU). Engines run eagerly (`enforce_eager`) on CPU. The load average
(`os.getloadavg`) is recorded before and after each mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np

MODES = ("plain", "directional", "reference_v0", "reference_v1")


def save_pair(root: str, hidden: int, layers: int, vocab: int) -> tuple[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed, name in ((0, "rl"), (1, "base")):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, dtype="float32")
        path = os.path.join(root, name)
        LlamaForCausalLM(cfg).save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference_step(rl_top: dict, base_top: dict, rng, threshold: float, gamma: float, top_p: float) -> int:
    """The reference script's step on top-50 lists: draw from the base's top-50 (top-p), redraw if Δlogp < τ."""
    ids = list(base_top)
    base_lp = np.array([base_top[i].logprob for i in ids])
    rl_min = min(v.logprob for v in rl_top.values())
    rl_lp = np.array([rl_top[i].logprob if i in rl_top else rl_min for i in ids])
    order = np.argsort(-base_lp)
    p = np.exp(base_lp[order] - base_lp.max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    pick = order[rng.choice(len(order), p=p)]
    if rl_lp[pick] - base_lp[pick] < threshold:
        ext = (1 + gamma) * rl_lp - gamma * base_lp
        r = np.exp(ext - ext.max())
        r /= r.sum()
        pick = rng.choice(len(ids), p=r)
    return ids[pick]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reference-max-tokens", type=int, default=1024,
                        help="longer reference_v0 runs are estimated from timed steps (see above)")
    parser.add_argument("--probe-points", type=int, default=5)
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--validate-estimate", action="store_true")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--top-p", type=float, default=0.7,
                        help="top-p of every mode (the reference scripts' 0.7; 1.0 shows the two-forward floor)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from hf_extrapolate import ExtrapolationConfig
    from hf_extrapolate.vllm import DirectionalLLM

    root = tempfile.mkdtemp(prefix="bench_vllm_")
    rl, base = save_pair(root, args.hidden, args.layers, args.vocab)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": [1] + rng.integers(3, args.vocab, args.prompt_length - 1).tolist()}
               for _ in range(args.batch)]
    max_len = args.prompt_length + max(args.tokens) + 8
    engine = dict(dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0, skip_tokenizer_init=True)
    config = ExtrapolationConfig(threshold=-0.3, gamma=0.1)
    results: dict = {"config": vars(args), "rows": []}

    def params(n, **kw):
        return SamplingParams(temperature=1.0, top_p=args.top_p, max_tokens=n, ignore_eos=True, detokenize=False, **kw)

    times: dict[tuple[str, int], float] = {}
    loads: dict[str, list[float]] = {}

    def dump(final: bool = False) -> None:
        """Rows from what is measured so far (written after every mode: a run cut short keeps its numbers)."""
        results["rows"] = []
        results["load_average_1min"] = loads
        for n in args.tokens:
            tokens = args.batch * n
            row = {"tokens": n, "batch": args.batch}
            for mode in MODES:
                if (mode, n) in times:
                    row[f"{mode}_tok_s"] = tokens / times[mode, n]
            if ("reference_v0_estimated", n) in times:
                row["reference_v0_estimated_tok_s"] = tokens / times["reference_v0_estimated", n]
                if ("reference_v0", n) in times:
                    row["reference_v0_estimate_relative_error"] = (
                        times["reference_v0_estimated", n] / times["reference_v0", n] - 1.0)
            if "directional_tok_s" in row:
                for other in ("plain", "reference_v0", "reference_v1", "reference_v0_estimated"):
                    if f"{other}_tok_s" in row:
                        row[f"directional_over_{other}"] = row["directional_tok_s"] / row[f"{other}_tok_s"]
            results["rows"].append(row)
            if final:
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v)
                                  for k, v in row.items()}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    def measure(mode: str, run, warm_up) -> None:
        warm_up()
        before = os.getloadavg()[0]
        for n in args.tokens:
            if mode.startswith("reference") and n > args.reference_max_tokens:
                continue
            times[mode, n] = timed(lambda n=n: run(n))
            print(mode, n, round(times[mode, n], 2), "s", flush=True)
        loads[mode] = [round(before, 2), round(os.getloadavg()[0], 2)]
        dump()

    if "plain" in args.modes:
        llm = LLM(model=rl, **engine)
        measure("plain", lambda n: llm.generate(prompts, params(n), use_tqdm=False),
                lambda: llm.generate(prompts, params(8), use_tqdm=False))
        del llm

    if "directional" in args.modes:
        directional = DirectionalLLM(rl, base_model=base, extrapolation_config=config, check_tokenizers=False,
                                     **engine)
        measure("directional", lambda n: directional.generate(prompts, params(n), use_tqdm=False),
                lambda: directional.generate(prompts, params(8), use_tqdm=False))
        del directional

    def reference_steps(reference):
        """Seconds per reference step (mean of `--probe-steps`) when every row holds `generated` new tokens."""
        def per_step(generated: int) -> float:
            filler = np.random.default_rng(generated)
            rows = [list(p["prompt_token_ids"]) + filler.integers(3, args.vocab, generated).tolist() for p in prompts]
            return timed(lambda: reference(args.probe_steps, rows=rows)) / args.probe_steps
        return per_step

    def estimate_reference(per_step, n: int) -> float:
        """Trapezoid integral over the run's steps 0..n-1 of the per-step time probed at evenly spaced points."""
        points = sorted({round(i * (n - 1) / (args.probe_points - 1)) for i in range(args.probe_points)})
        cost = [per_step(t) for t in points]
        return float(sum((b - a) * (ca + cb) / 2 for a, b, ca, cb in zip(points, points[1:], cost, cost[1:]))
                     + (cost[0] + cost[-1]) / 2)

    step = SamplingParams(temperature=1.0, max_tokens=1, logprobs=50, detokenize=False)
    for mode in ("reference_v0", "reference_v1"):
        if mode not in args.modes:
            continue
        caching = mode == "reference_v1"
        rl_llm = LLM(model=rl, max_logprobs=50, enable_prefix_caching=caching, **engine)
        base_llm = LLM(model=base, max_logprobs=50, enable_prefix_caching=caching, **engine)
        results.setdefault("prefix_caching", {})[mode] = [
            e.llm_engine.vllm_config.cache_config.enable_prefix_caching for e in (rl_llm, base_llm)]

        def reference(n: int, rl_llm=rl_llm, base_llm=base_llm, rows=None) -> None:
            rows = [list(p["prompt_token_ids"]) for p in prompts] if rows is None else rows
            for _ in range(n):
                batch = [{"prompt_token_ids": r} for r in rows]
                rl_out = rl_llm.generate(batch, step, use_tqdm=False)
                base_out = base_llm.generate(batch, step, use_tqdm=False)
                for row, a, b in zip(rows, rl_out, base_out):
                    row.append(reference_step(a.outputs[0].logprobs[0], b.outputs[0].logprobs[0], rng, -0.3, 0.1,
                                              args.top_p))

        measure(mode, reference, lambda reference=reference: reference(2))
        if mode == "reference_v0":
            estimate = [n for n in args.tokens if n > args.reference_max_tokens or args.validate_estimate]
            for n in estimate:
                times["reference_v0_estimated", n] = estimate_reference(reference_steps(reference), n)
                print("reference_v0_estimated", n, round(times["reference_v0_estimated", n], 2), "s", flush=True)
            dump()
        del rl_llm, base_llm

    dump(final=True)


if __name__ == "__main__":
    main()
