"""Time the directional step alone: the fused CPU kernel (`hf_extrapolate.cpu_kernel`) against eager `fast_step`.

Scores are (B, V) float32 logits drawn like a language model's (a heavy-tailed spread of about 20 nats, one column
masked to -inf as `min_new_tokens` masks EOS), each path with its own workspace reused between calls (as the
logits processor keeps one); before every call a 64 MB buffer is written, so that the scores come
from memory as they do after a forward. The two paths alternate call by call; the median of `--calls` calls each.

    python benchmarks/bench_step.py --batch 1 4 8 --vocab 32000 --json step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_extrapolate import ExtrapolationConfig, cpu_kernel  # noqa: E402
from hf_extrapolate.fast_step import Workspace, fast_step  # noqa: E402

CONFIG = ExtrapolationConfig(criterion="logp_diff", threshold=-0.3, gamma=0.1)


def scores(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rl = 4.0 * torch.randn(batch, vocab, generator=g) + 6.0 * torch.rand(batch, vocab, generator=g) ** 8
    base = rl + 0.5 * torch.randn(batch, vocab, generator=g)
    rl[:, 2] = float("-inf")  # a masked token (EOS under min_new_tokens)
    return rl, base


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_kernel.enable()
    kernel = cpu_kernel.active()
    junk = torch.empty(16 * 2**20)
    results = []
    for batch in args.batch:
        rl, base = scores(batch, args.vocab, seed=batch)
        for mode in ("greedy", "sample"):
            greedy = mode == "greedy"
            times: dict[str, list[float]] = {"kernel": [], "eager": []}
            spaces = {path: Workspace() for path in times}  # buffers reused call to call, as the processor does
            for call in range(args.calls + 5):
                for path in ("kernel", "eager"):
                    cpu_kernel._module = kernel if path == "kernel" else None
                    junk.add_(1.0)  # evict the scores from the caches
                    start = time.perf_counter()
                    fast_step(rl, base, CONFIG, greedy=greedy, workspace=spaces[path])
                    elapsed = time.perf_counter() - start
                    if call >= 5:  # warm-up calls (workspace allocation) are not counted
                        times[path].append(elapsed)
            cpu_kernel._module = kernel
            row = {"batch": batch, "vocab": args.vocab, "mode": mode,
                   **{f"{p}_us": 1e6 * statistics.median(t) for p, t in times.items()}}
            row["kernel_vs_eager"] = row["kernel_us"] / row["eager_us"]
            results.append(row)
            print(f"batch {batch:2d} {mode:6s} kernel {row['kernel_us']:7.0f} us  eager {row['eager_us']:7.0f} us  "
                  f"({row['kernel_vs_eager']:.2f}x)")
    report = {"results": results, "meta": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "capability": cpu_kernel.capability(), "calls": args.calls, "load_average": os.getloadavg(),
        "config": CONFIG.to_dict()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
