"""Diagnostics of an RL model against its base: token-level metrics, histograms, top tokens, threshold calibration.

Importing this package does not import matplotlib (plots import it when drawing).
"""

from .calibration import (
    CALIBRATABLE,
    Calibration,
    ReplacementStatistics,
    calibrate_threshold,
    replacement_statistics,
    sample_statistics,
)
from .summaries import HISTOGRAM_METRICS, histogram_counts, metric_summary, plot_token_histograms, top_tokens
from .token_metrics import METRICS, AlignedChunk, aligned_logprobs, token_metrics

__all__ = [
    "CALIBRATABLE",
    "HISTOGRAM_METRICS",
    "METRICS",
    "AlignedChunk",
    "Calibration",
    "ReplacementStatistics",
    "aligned_logprobs",
    "calibrate_threshold",
    "histogram_counts",
    "metric_summary",
    "plot_token_histograms",
    "replacement_statistics",
    "sample_statistics",
    "token_metrics",
    "top_tokens",
]
