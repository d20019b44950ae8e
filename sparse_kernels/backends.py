"""Attention backends for a block mask, by name: `reference`, `flex` (and, later, `triton`).

Owns the registry and `resolve_backend` (what `auto` means on a device). A new backend is one
function with the signature of `reference_attention` plus one line in BACKENDS.
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .flex import flex_block_attention
from .reference import reference_attention


def _reference(q, k, v, block_mask, block_size, scale, attn_mask, key_valid):
    return reference_attention(q, k, v, block_mask, block_size, scale, attn_mask)


def _flex(q, k, v, block_mask, block_size, scale, attn_mask, key_valid):
    return flex_block_attention(q, k, v, block_mask, block_size, scale, key_valid)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": _reference, "flex": _flex}
BACKEND_CHOICES = ("auto", *BACKENDS)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` -> the fastest available on `device`; an explicit name is checked and returned."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_CHOICES)}")
    return name
