"""Math evaluation of base, RL and directional decoding: prompts, answer checking, Avg@k / Pass@k, resumable runs.

Importing this package needs neither matplotlib (plots import it when drawing) nor Math-Verify (`is_correct` imports
it when checking).
"""

from .answers import SCORERS, extract_boxed, extract_boxed_strict, is_correct
from .data import Problem, load_datasets, load_problems
from .generation import GenerationSettings, Responses, generate_responses
from .metrics import default_ks, format_summary, pass_at_k, per_problem_accuracy, summarize
from .modes import EvalMode
from .plots import plot_accuracy_vs_ratio, plot_problem_heatmap
from .prompts import INSTRUCTION, build_prompt, format_question
from .results import merge_results, read_records
from .runner import evaluate

__all__ = [
    "INSTRUCTION",
    "EvalMode",
    "GenerationSettings",
    "Problem",
    "Responses",
    "build_prompt",
    "default_ks",
    "evaluate",
    "SCORERS",
    "extract_boxed",
    "extract_boxed_strict",
    "format_question",
    "format_summary",
    "generate_responses",
    "is_correct",
    "load_datasets",
    "load_problems",
    "merge_results",
    "pass_at_k",
    "per_problem_accuracy",
    "plot_accuracy_vs_ratio",
    "plot_problem_heatmap",
    "read_records",
    "summarize",
]
