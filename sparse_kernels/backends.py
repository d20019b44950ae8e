"""Attention backends for a block mask, by name: `reference`, `flex`, `triton`.

Owns the registry and `resolve_backend` (what `auto` means on a device: `triton` on CUDA when
Triton is installed, else `flex`; `reference` on CPU). `triton` hands shapes its kernel does not
cover (padding masks, other head dims or dtypes) to `flex` on CUDA and `reference` elsewhere.
A new backend is one function with the signature of `_reference` plus one line in BACKENDS;
`index` (counts, indices), when the caller has it, saves the Triton backend a sort of the mask.
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .flex import flex_block_attention
from .reference import reference_attention
from . import triton_attention


def _reference(q, k, v, block_mask, block_size, scale, attn_mask, key_valid, index=None):
    return reference_attention(q, k, v, block_mask, block_size, scale, attn_mask)


def _flex(q, k, v, block_mask, block_size, scale, attn_mask, key_valid, index=None):
    return flex_block_attention(q, k, v, block_mask, block_size, scale, key_valid)


def _triton(q, k, v, block_mask, block_size, scale, attn_mask, key_valid, index=None):
    """`index` = (counts, indices) from `select_blocks_with_index`, else derived from the mask."""
    if not triton_attention.supports(q, block_size, key_valid):
        fallback = _flex if q.is_cuda else _reference
        return fallback(q, k, v, block_mask, block_size, scale, attn_mask, key_valid)
    if index is None:
        return triton_attention.triton_block_attention(q, k, v, block_mask, block_size, scale)
    return triton_attention.block_sparse_attention(q, k, v, *index, block_size, scale)[0]


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": _reference, "flex": _flex, "triton": _triton}
BACKEND_CHOICES = ("auto", *BACKENDS)


SELECTIONS = ("torch", "triton")


def resolve_selection(device: torch.device, name: str | None = None) -> str:
    """Which block selection runs: `name` if given; else SPARSE_FUSED_TOPK (0: torch, 1: triton
    wherever Triton runs, the interpreter in tests); else triton on CUDA with Triton, torch elsewhere."""
    if name is None:
        flag = os.environ.get("SPARSE_FUSED_TOPK")
        if flag is not None and flag not in ("0", "1"):
            raise ValueError(f"SPARSE_FUSED_TOPK must be 0 or 1, got {flag!r}")
        name = ("triton" if device.type == "cuda" else "torch") if flag is None else ("triton" if flag == "1" else "torch")
    if name not in SELECTIONS:
        raise ValueError(f"unknown selection {name!r}; choose one of {list(SELECTIONS)}")
    return "triton" if name == "triton" and triton_attention.available(device) else "torch"


def selection(device: torch.device, name: str | None = None):
    """The `fused` argument of `select.select_blocks*` for this device: None (plain torch) or the
    Triton selection. THE place that chooses it."""
    if resolve_selection(device, name) == "torch":
        return None
    from .triton_select import fused_select
    return fused_select


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` -> the fastest available on `device`; an explicit name is checked and returned."""
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        return "triton" if triton_attention.available(device) else "flex"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_CHOICES)}")
    return name


SWITCHES = ("SPARSE_FUSED_TOPK", "SPARSE_FUSED_PROBE", "SPARSE_KERNEL_LOOP")   # environment, for A/B runs


def switch_problem() -> str | None:
    """The first of `SWITCHES` set to a value it refuses, as one line naming the fix; None when every
    one is unset or valid. Command lines and `attach` check it up front, so a typo does not surface
    mid-forward (where the hook would run the call dense) or mid-benchmark."""
    from . import triton_probe
    cpu = torch.device("cpu")
    for check in (lambda: resolve_selection(cpu), lambda: triton_probe.fused_probe_enabled(cpu, 64),
                  triton_attention.default_loop):
        try:
            check()
        except ValueError as e:
            return f"{e}; unset it or give a value it names"
    return None
