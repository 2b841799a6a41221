"""The benchmark script runs end to end on a tiny configuration and writes every row (no speed is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
ROWS = {"rl", "base", "minimal", "directional", "directional_wrapper", "peft", "lora_fused", "lora_fallback", "naive"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_benchmark_writes_all_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    configs = {(r["batch"], r["new_tokens"], r["mode"]) for r in report["results"]}
    assert {mode for _, _, mode in configs} == {"greedy", "sample"}
    for config in configs:
        rows = {r["row"]: r for r in report["results"] if (r["batch"], r["new_tokens"], r["mode"]) == config}
        assert set(rows) == ROWS, config
        for r in rows.values():
            for key in ("seconds", "tokens_per_s", "ratio_to_rl", "peak_memory_mb"):
                assert _positive(r[key]), (config, r["row"], key, r[key])
    for s in report["summary"]:
        for key in ("directional_vs_rl_plus_base", "directional_vs_minimal", "directional_vs_minimal_from_parts",
                    "lora_fused_vs_peft", "lora_fallback_vs_peft", "lora_fused_memory_vs_peft"):
            assert _positive(s[key]), (s, key)
    assert report["processor_math"] and all(_positive(m["step_ms"]) for m in report["processor_math"])
    for m in report["processor_math"]:  # the directional processor does more outside the base forward than minimal
        assert 0 < m["minimal_outside_base_ms"] < m["directional_outside_base_ms"] < m["minimal_step_ms"], m
    ops = report["operators_per_step"]  # the minimal loop feeds one token (a handful of ops); the processor does more
    for mode in ("greedy", "sample"):
        assert 0 < ops[mode]["minimal"] < ops[mode]["directional"], ops
    assert report["meta"]["threads"] >= 1 and "|" in proc.stdout  # the markdown table is printed


def test_step_benchmark_times_both_paths(tmp_path):
    """benchmarks/bench_step.py (the fused kernel against eager fast_step) runs on a small shape and reports both."""
    out = tmp_path / "step.json"
    script = SCRIPT.parent / "bench_step.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--batch", "1", "2", "--vocab", "300", "--calls", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["batch"], r["mode"]) for r in results} == {(b, m) for b in (1, 2) for m in ("greedy", "sample")}
    for r in results:
        assert _positive(r["kernel_us"]) and _positive(r["eager_us"]) and _positive(r["kernel_vs_eager"]), r
