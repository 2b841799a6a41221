"""Total-variation distance between the reference code's top-k-view step and the exact step, on synthetic pairs.

Synthetic next-token distributions: base logits ~ N(0, 1) * sharpness over a vocabulary of V tokens (a few tokens
boosted to make a head), RL logits = base logits + N(0, sigma) noise. For each sharpness we report the mass the
proposal's top-k holds and the mean / max TV distance between the step distributions of `view_top_k=k` and
`view_top_k=None` (same gate, gamma, temperature, top-p). Synthetic numbers: they show the size of the effect, not
what a real pair gives.

    python benchmarks/view_vs_exact.py --vocab 32000 --rows 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_extrapolate, not an installed one
from hf_extrapolate import ExtrapolationConfig, directional_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--sigma", type=float, default=0.5, help="std of the RL - base logit noise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    results = []
    for proposal in ("base", "rl"):
        for sharpness in (8.0, 6.0, 5.0, 4.0, 2.0):
            base = torch.randn(args.rows, args.vocab, generator=g) * sharpness
            rl = base + torch.randn(args.rows, args.vocab, generator=g) * args.sigma
            cfg = ExtrapolationConfig.preset("dapo-32b", proposal=proposal)
            prop = (base if proposal == "base" else rl).log_softmax(-1)
            head = prop.exp().topk(args.k, dim=-1).values.sum(-1)
            exact = directional_step(rl, base, cfg.replace(view_top_k=None))[0].exp()
            view = directional_step(rl, base, cfg.replace(view_top_k=args.k))[0].exp()
            tv = 0.5 * (exact - view).abs().sum(-1)
            results.append({"proposal": proposal, "sharpness": sharpness, "top_k_mass": float(head.mean()),
                            "tv_mean": float(tv.mean()), "tv_max": float(tv.max())})
            print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
