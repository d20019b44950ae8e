"""Tasks: seeded offline generators sized in model tokens, the RULER JSONL reader, scoring.

Importing this package registers every generator in TASKS. Imports nothing from `controller`.
"""
from . import extraction, natural, niah, qa, vt  # noqa: F401  (registration)
from .base import (TASK_TYPES, TASKS, UNKNOWN_TASK, Sample, TaskSpec, build_task, generate_sample, prompt_ids,
                   prompt_text)
from .prompts import read_prompts
from .ruler import read_ruler, task_type_of, write_ruler
from .scoring import score

__all__ = ["TASKS", "TASK_TYPES", "UNKNOWN_TASK", "Sample", "TaskSpec", "build_task", "generate_sample",
           "prompt_ids", "prompt_text", "read_prompts", "read_ruler", "score", "task_type_of", "write_ruler"]
