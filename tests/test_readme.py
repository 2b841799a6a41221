"""Every ```python block of the README runs, top to bottom, in one namespace (the README's claims stay true)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        if block.startswith("# illustrative"):
            continue
        code = block.replace("/tmp/hf_extrapolate_pair", str(tmp_path / "pair"))
        exec(compile(code, f"README.md:python-block-{i}", "exec"), namespace)  # noqa: S102
