"""Reading (and writing) RULER-format JSONL: one JSON object per line with `input`, `outputs`,
`length` and optional `answer_prefix`; other fields are ignored. `parse_request` also reads the
label-free prompt format (only `input` required), which `data.tasks.prompts` builds on.

Samples are keyed by file and line (RULER's `index` is not always unique). The task type comes
from the file's folder or name where RULER puts it (`niah_single_1`, `vt`, `cwe`, `qa_2`, ...),
else `unknown`. A malformed line is a UserError naming the file and line. Imports nothing from
`controller`."""
from __future__ import annotations

import json
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
    raise UserError(f"path {p} does not exist; pass a JSONL file or a folder of them")


def _load_json(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; each line must be one flat JSON object") from None


def _outputs_of(row: dict, where: str, required: bool) -> tuple[str, ...]:
    if "outputs" not in row and not required:
        return ()
    outputs = row.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise UserError(f"{where}: `outputs` must be a non-empty list of strings"
                        + ("" if required else " (or leave it out: the fidelity criterion needs no answers)"))
    return tuple(outputs)


MAX_PROMPT_BYTES = 8 << 20   # one request's line or file: ~2M tokens, beyond any supported model's window


def check_prompt_size(size: int, where: str) -> None:
    if size > MAX_PROMPT_BYTES:
        raise UserError(f"{where}: {size:,} bytes is longer than any model's context (at most {MAX_PROMPT_BYTES:,} bytes "
                        "per request); split or shorten it")


def _check_encodable(row: dict, where: str) -> None:
    """JSON's \\ud800-style escapes can decode to lone surrogates, which no tokenizer accepts."""
    texts = [row.get("input"), row.get("answer_prefix"), *(row.get("outputs") or [])]
    for text in (t for t in texts if isinstance(t, str)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{where}: the text holds a lone surrogate ({text[e.start]!a} at character {e.start}), "
                            "not valid Unicode; fix that escape in the JSON") from None


ROLES = ("system", "user", "assistant")


def _from_messages(row: dict, where: str) -> tuple[tuple[tuple[str, str], ...], dict]:
    """An OpenAI-style `messages` line: the turns before the last one, and the row with the last
    (a user turn) as its `input`. The chat template is applied to the whole conversation."""
    msgs = row["messages"]
    if (not isinstance(msgs, list) or not msgs or any(not isinstance(m, dict) or m.get("role") not in ROLES
                                                       or not isinstance(m.get("content"), str) for m in msgs)):
        raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects with role one of "
                        f"{list(ROLES)} and content a string")
    if msgs[-1]["role"] != "user":
        raise UserError(f"{where}: the last of `messages` must be the user's turn (the request to answer), "
                        f"got {msgs[-1]['role']!r}")
    _check_encodable({"input": "".join(m["content"] for m in msgs)}, where)
    history = tuple((m["role"], m["content"]) for m in msgs[:-1])
    return history, {**{k: v for k, v in row.items() if k != "messages"}, "input": msgs[-1]["content"]}


def parse_request(line: str, where: str, task: str, source: str, require_outputs: bool = True) -> Sample:
    """One JSONL line -> Sample. RULER lines need input, outputs and length; with
    `require_outputs=False` only `input` is needed (`outputs`, `length`, `answer_prefix` and `task`
    are optional; a `task` field overrides the one from the path)."""
    check_prompt_size(len(line.encode("utf-8", "surrogatepass")), where)
    row = _load_json(line, where)
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with an `input` string")
    history = ()
    if "messages" in row and "input" not in row and not require_outputs:
        history, row = _from_messages(row, where)
    required = ("input", "outputs", "length") if require_outputs else ("input",)
    missing = [k for k in required if k not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; " + ("RULER lines need input, outputs, length"
                        if require_outputs else "each line needs at least an `input` string"))
    if not isinstance(row["input"], str) or not row["input"].strip():
        raise UserError(f"{where}: `input` must be a non-empty string")
    outputs = _outputs_of(row, where, require_outputs)
    _check_encodable(row, where)
    length = row.get("length", 0)
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise UserError(f"{where}: `length` must be an integer >= 0, got {length!r}")
    for key in ("answer_prefix", "task"):
        if key in row and not isinstance(row[key], str):
            raise UserError(f"{where}: `{key}` must be a string, got {row[key]!r}")
    if "task" in row:
        task = row["task"] if row["task"] in TASK_TYPES else UNKNOWN_TASK
    family = "niah" if task.startswith("niah") else task
    return Sample(sample_id=where, task=task, input=row["input"], outputs=outputs,
                  answer_prefix=row.get("answer_prefix", ""), target_length=length,
                  metric="part" if task == "qa" else "all", max_new_tokens=MAX_NEW_TOKENS[family],
                  group=where, source=source, history=history)


def read_jsonl(path: str | Path, prefix: str, require_outputs: bool) -> list[Sample]:
    """Every request of a JSONL file or folder of them, keyed `{prefix}:{relative path}:{line}`."""
    samples: list[Sample] = []
    root = Path(path)
    for f in jsonl_files(root):
        task = task_type_of(f)
        rel = f.name if root.is_file() else str(f.relative_to(root))
        try:
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        samples.append(parse_request(line, f"{prefix}:{rel}:{lineno}", task, str(f), require_outputs))
        except UnicodeDecodeError as e:
            raise UserError(f"{f}: not UTF-8 text (byte {e.start}); save the file as UTF-8 JSONL") from None
    if not samples:
        raise UserError(f"{path}: no samples found (empty file?)")
    return samples


def read_ruler(path: str | Path) -> list[Sample]:
    """All samples of a RULER JSONL file or folder. Raises UserError on the first bad line."""
    return read_jsonl(path, "ruler", require_outputs=True)


def write_ruler(samples: list[Sample], path: str | Path) -> None:
    """Write samples as RULER JSONL (atomically: a temporary name, then rename)."""
    from ..store import atomic_target
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, s in enumerate(samples):
            fh.write(json.dumps({"index": i, "input": s.input, "outputs": list(s.outputs),
                                 "length": s.target_length, "answer_prefix": s.answer_prefix}) + "\n")


assert set(MAX_NEW_TOKENS) >= {"niah", *[t for t in TASK_TYPES if not t.startswith("niah")], UNKNOWN_TASK}
