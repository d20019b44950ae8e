"""User prompts without answers, for label-free calibration (`calibrate.py --prompts`).

Owns `read_prompts`, which accepts:
- a JSONL file, or a folder searched recursively for *.jsonl: each line `{"input": ...}` with
  optional `answer_prefix`, `task`, and RULER's `outputs` / `length` (RULER files work as they are),
  or OpenAI-style `{"messages": [{"role": ..., "content": ...}, ...]}` ending in the user's turn;
- a folder of *.txt files (searched recursively; each file is one prompt, task `unknown`).
Requests are keyed `prompts:{relative path}:{line}` (or `prompts:{relative path}` for text files).
A bad line or file is one UserError naming it. Imports nothing from `controller`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import UNKNOWN_TASK, Sample
from .ruler import MAX_NEW_TOKENS, check_prompt_size, read_jsonl


def _text_file(f: Path, rel: str) -> Sample:
    check_prompt_size(f.stat().st_size, str(f))   # before reading: a huge file is refused, not loaded
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{f}: not UTF-8 text (byte {e.start}); save prompts as UTF-8") from None
    if not text.strip():
        raise UserError(f"{f}: empty prompt; remove the file or give it text")
    key = f"prompts:{rel}"
    return Sample(sample_id=key, task=UNKNOWN_TASK, input=text, outputs=(), max_new_tokens=MAX_NEW_TOKENS[UNKNOWN_TASK],
                  group=key, source=str(f))


def read_prompts(path: str | Path) -> list[Sample]:
    """Every prompt under `path` (see the module docstring for the formats)."""
    p = Path(path)
    if p.is_dir() and not any(p.rglob("*.jsonl")):
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise UserError(f"no *.jsonl or *.txt files under {p}; pass a JSONL file or a folder of prompts")
        return [_text_file(f, str(f.relative_to(p))) for f in files]
    if p.is_file() and p.suffix == ".txt":
        return [_text_file(p, p.name)]
    return read_jsonl(p, "prompts", require_outputs=False)
