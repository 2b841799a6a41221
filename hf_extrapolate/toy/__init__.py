"""The built-in toy base/RLVR pair: a tiny Llama trained by this library on a verifiable arithmetic task.

- `task`: problems, chain-of-thought traces ending in `\\boxed{N}`, imperfect traces, the 1/0 verifier;
- `tokenizer`: a small word-level tokenizer with a chat template;
- `train`: `build_toy_pair` (SFT to the base, then DAPO with TRL to the RL model);
- `pair`: `load_toy_pair` (the shipped pair, or a built one).
"""

from .pair import TOY_PAIR_DIR, load_toy_pair, toy_pair_info
from .task import Problem, TaskConfig, extract_boxed, reference_trace, sample_problems, verify
from .tokenizer import build_toy_tokenizer
from .train import ToyPairConfig, ToyPairResult, build_toy_pair, evaluate_toy_model, held_out_problems

__all__ = [
    "TOY_PAIR_DIR",
    "Problem",
    "TaskConfig",
    "ToyPairConfig",
    "ToyPairResult",
    "build_toy_pair",
    "build_toy_tokenizer",
    "evaluate_toy_model",
    "extract_boxed",
    "held_out_problems",
    "load_toy_pair",
    "reference_trace",
    "sample_problems",
    "toy_pair_info",
    "verify",
]
