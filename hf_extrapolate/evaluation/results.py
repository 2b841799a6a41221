"""The JSON Lines result file: one record per (mode, data set, problem, sample), resumable and mergeable.

While a run is going, process 0 appends to the output file and process `r > 0` to `<output>.part<r>`; a record is
written once its whole batch has been generated. An interrupted run leaves at most one cut-off last line, which
`read_records` ignores and `repair_tail` removes. At the end the main process merges all files, drops duplicates and
rewrites the output in the run's canonical order (mode, data set, problem, sample), so a resumed run, a single-process
run and a data-parallel run of the same settings produce the same file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RecordKey = tuple[str, str, str, int]
KEY_FIELDS = ("mode", "dataset", "problem_id", "sample")


def record_key(record: Mapping[str, Any]) -> RecordKey:
    """`(mode, dataset, problem_id, sample)`: what makes a record unique in a result file."""
    return (str(record["mode"]), str(record["dataset"]), str(record["problem_id"]), int(record["sample"]))


def part_path(output: str | os.PathLike, process_index: int) -> Path:
    """Where process `process_index` appends its records (the output itself for process 0)."""
    output = Path(output)
    return output if process_index == 0 else output.with_name(f"{output.name}.part{process_index}")


def part_files(output: str | os.PathLike) -> list[Path]:
    """The output and every `<output>.part<r>` file that exists, process 0 first."""
    output = Path(output)
    parts = sorted(output.parent.glob(f"{output.name}.part*"), key=lambda p: (len(p.name), p.name))
    return ([output] if output.exists() else []) + [p for p in parts if p.name[len(output.name) + 5 :].isdigit()]


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of one file; a cut-off last line (an interrupted write) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was interrupted
                logger.warning("%s: ignoring the cut-off last line (an interrupted write).", path)
                continue
            raise ValueError(f"{path}:{number} is not a JSON record ({err.msg}); fix or delete the file.") from err
        missing = [k for k in KEY_FIELDS if k not in record] if isinstance(record, dict) else list(KEY_FIELDS)
        if missing:
            raise ValueError(
                f"{path}:{number} is not an evaluation record (it lacks {missing}): the file was not written by "
                "hf-extrapolate eval/sweep; choose another output file (or delete this one)."
            )
        records.append(record)
    return records


def repair_tail(path: str | os.PathLike) -> None:
    """Cut a file back to its last complete line, so that appending starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_records(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records as JSON lines and flush."""
    with Path(path).open("a", encoding="utf-8") as f:
        for record in records:
            f.write(dumps(record) + "\n")
        f.flush()


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=True)


def merge_results(
    output: str | os.PathLike, order: Callable[[RecordKey], Any] | None = None
) -> list[dict[str, Any]]:
    """Merge the output and its part files into the output (atomically), dropping duplicates; delete the parts.

    `order(key)` gives the sort key of a record key; records whose `order` is None keep their place after the others.
    Returns the merged records.
    """
    output = Path(output)
    files = part_files(output)
    merged: dict[RecordKey, dict[str, Any]] = {}
    for path in files:
        for record in read_records(path):
            merged.setdefault(record_key(record), record)
    records = list(merged.values())
    if order is not None:
        ranked = [(order(record_key(r)), i, r) for i, r in enumerate(records)]
        known = sorted((x for x in ranked if x[0] is not None), key=lambda x: x[0])
        records = [r for _, _, r in known] + [r for o, _, r in ranked if o is None]
    output.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of this call's own, renamed atomically: two runs merging into one output never share it
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(dumps(record) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output gets the usual permissions
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    for path in files:
        if path != output:
            with contextlib.suppress(FileNotFoundError):  # another run merging the same output removed it
                path.unlink()
    return records
