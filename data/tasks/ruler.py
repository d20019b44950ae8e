"""Reading (and writing) RULER-format JSONL: one JSON object per line with `input`, `outputs`,
`length` and optional `answer_prefix`; other fields are ignored.

Samples are keyed by file and line (RULER's `index` is not always unique). The task type comes
from the file's folder or name where RULER puts it (`niah_single_1`, `vt`, `cwe`, `qa_2`, ...),
else `unknown`. A malformed line is a UserError naming the file and line. Imports nothing from
`controller`."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UserError
from .base import TASK_TYPES, UNKNOWN_TASK, Sample

MAX_NEW_TOKENS = {"niah": 64, "vt": 32, "cwe": 96, "fwe": 48, "qa": 24, UNKNOWN_TASK: 64}
_RULER_NAME = re.compile(r"^(niah_(single|multikey|multivalue|multiquery)|vt|cwe|fwe|qa)(_\d+)?$")


def task_type_of(path: Path) -> str:
    """RULER task type from the folder or file name, else `unknown`."""
    for part in (path.stem, path.parent.name):
        m = _RULER_NAME.match(part)
        if m:
            return m.group(1)
    return UNKNOWN_TASK


def jsonl_files(path: str | Path) -> list[Path]:
    """A JSONL file, or every *.jsonl under a folder (recursively), sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.rglob("*.jsonl"))
        if files:
            return files
        raise UserError(f"no *.jsonl files under {p}; pass a RULER JSONL file or a folder of them")
    raise UserError(f"RULER path {p} does not exist")


def _parse_line(line: str, where: str, task: str, source: str) -> Sample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with input/outputs/length")
    missing = [k for k in ("input", "outputs", "length") if k not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; RULER lines need input, outputs, length")
    outputs = row["outputs"]
    if not isinstance(row["input"], str) or not isinstance(outputs, list) or not outputs \
            or not all(isinstance(o, str) for o in outputs):
        raise UserError(f"{where}: `input` must be a string and `outputs` a non-empty list of strings")
    if not isinstance(row["length"], int) or isinstance(row["length"], bool):
        raise UserError(f"{where}: `length` must be an integer, got {row['length']!r}")
    family = "niah" if task.startswith("niah") else task
    return Sample(sample_id=where, task=task, input=row["input"], outputs=tuple(outputs),
                  answer_prefix=str(row.get("answer_prefix", "")), target_length=row["length"],
                  metric="part" if task == "qa" else "all", max_new_tokens=MAX_NEW_TOKENS[family],
                  group=where, source=source)


def read_ruler(path: str | Path) -> list[Sample]:
    """All samples of a RULER JSONL file or folder. Raises UserError on the first bad line."""
    samples: list[Sample] = []
    root = Path(path)
    for f in jsonl_files(root):
        task = task_type_of(f)
        rel = f.name if root.is_file() else str(f.relative_to(root))
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    samples.append(_parse_line(line, f"ruler:{rel}:{lineno}", task, str(f)))
    if not samples:
        raise UserError(f"{path}: no samples found (empty file?)")
    return samples


def write_ruler(samples: list[Sample], path: str | Path) -> None:
    """Write samples as RULER JSONL (atomically: a temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, s in enumerate(samples):
            fh.write(json.dumps({"index": i, "input": s.input, "outputs": list(s.outputs),
                                 "length": s.target_length, "answer_prefix": s.answer_prefix}) + "\n")
    os.replace(tmp, path)


assert set(MAX_NEW_TOKENS) >= {"niah", *[t for t in TASK_TYPES if not t.startswith("niah")], UNKNOWN_TASK}
