"""`hf-extrapolate demo` on the shipped toy pair: output shape, highlighting, the gate's effect, argument errors."""

from __future__ import annotations

import re

import pytest

from hf_extrapolate.cli import main

LABELS = ("base", "RL", "Token Replacement", "Selective Extrapolate", "RL + Selective Extrapolate")
REPLACE, SELECTIVE, ON_RL = "Token Replacement (τ={})", "Selective Extrapolate (γ=0.1)", "RL + Selective Extrapolate (γ=0.1)"


def run_demo(capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["demo", "--show", "2", "--eval-problems", "12", "--samples", "2", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out: str) -> dict[str, tuple[float, float]]:
    """{label: (accuracy %, replaced %)} from the accuracy table."""
    rows = {}
    for line in out.split("Accuracy on", 1)[1].splitlines()[2:]:
        m = re.match(r"\s+(.+?)\s+([\d.]+)%\s+([\d.]+)%$", line)
        assert m, line
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_demo_prints_completions_of_every_mode_and_the_accuracy_table(capsys):
    code, out, err = run_demo(capsys, "--no-color")
    assert code == 0 and "Loading weights" not in out + err
    assert "Accuracy on 12 held-out problems, 2 sample(s) each" in out
    assert out.count("(answer ") == 2
    for label in LABELS:
        row = re.compile(rf"\s+{re.escape(label)}( \(.*?\))?\s{{2,}}")
        assert sum(bool(row.match(line)) for line in out.splitlines()) == 3  # 2 problems + the table
    rows = table(out)
    assert len(rows) == 5 and all(0 <= acc <= 100 and 0 <= rep <= 100 for acc, rep in rows.values())
    assert rows["base"][1] == 0.0 and rows["RL"][1] == 100.0
    assert "\033[" not in out
    # the base and RL rows never carry redraw marks
    for line in out.splitlines():
        if line.strip().startswith(("base ", "RL ")) and not line.strip().startswith("RL +") and "%" not in line:
            assert "[" not in line.replace("\\boxed{", "")


def test_gate_always_on_redraws_every_token_and_never_redraws_none(capsys):
    _, out, _ = run_demo(capsys, "--no-color", "--threshold", "1000")
    rows = table(out)
    assert rows[REPLACE.format(1000)][1] == 100.0 and rows[SELECTIVE][1] == 100.0 and rows[ON_RL][1] == 100.0
    # every token redrawn from pi_x: the two extrapolation rows draw from the same distribution whoever proposes
    shown = out.split("Accuracy on")[0].splitlines()
    for label in (REPLACE.format(1000), SELECTIVE, ON_RL):
        lines = [line for line in shown if line.strip().startswith(label)]
        assert lines and all("[" in line for line in lines)  # every shown token of the mode is marked

    _, out, _ = run_demo(capsys, "--no-color", "--threshold", "-1000")
    rows = table(out)
    assert rows[REPLACE.format(-1000)][1] == 0.0 and rows[SELECTIVE][1] == 0.0 and rows[ON_RL][1] == 0.0
    # nothing redrawn: the base-proposing modes are the base model and the RL-proposing one the RL model
    assert rows[REPLACE.format(-1000)][0] == rows["base"][0] == rows[SELECTIVE][0]
    assert rows[ON_RL][0] == rows["RL"][0]


def test_color_highlights_with_ansi(capsys):
    _, out, _ = run_demo(capsys, "--color", "--threshold", "1000")
    assert "\033[1;33m" in out


@pytest.mark.parametrize(
    "args, message",
    [(["--samples", "0"], "--samples must be >= 1"), (["--show", "-1"], "--show must be >= 0"),
     (["--temperature", "-1"], "--temperature must be >= 0"), (["--pair", "/nonexistent"], "No toy pair")],
)
def test_bad_arguments_are_one_line_errors(capsys, args, message):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
