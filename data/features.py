"""THE feature extractor: one function used by labeling (offline) and by the inference hook.

Owns FEATURE_VERSION, FEATURE_NAMES, `ProbeCollector` (the probe callback a SparsePlan calls in
its dense probe layers; it averages each statistic over those layers) and `compute_features`
(length, text statistics of the token ids, attention probe statistics, task one-hot with
`unknown`). Everything is computed before any sparse layer runs, from the same forward pass.
Bump FEATURE_VERSION whenever a definition changes: stores and checkpoints record it and loaders
refuse a mismatch. Imports `sparse_kernels` only; never `controller`.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from sparse_kernels.probes import PROBE_STATS

from .tasks.base import TASK_TYPES, UNKNOWN_TASK

# 2: mass recall of the block selection at every level (probes.mass_recall);
# 3: compression_ratio at zlib level 1, not 6 (on the H200's host level 6 took 19.3 ms at 32K tokens,
#    longer than the GPU's two probe layers, and the decision waited for it; level 1: 3.0 ms)
FEATURE_VERSION = 3
ZLIB_LEVEL = 1
TEXT_STATS = ("compression_ratio", "unique_token_ratio", "repeated_bigram_ratio")
TASK_FEATURES = tuple(f"task_{t}" for t in (*TASK_TYPES, UNKNOWN_TASK))
FEATURE_NAMES = ("log_length", *TEXT_STATS, *(f"probe_{s}" for s in PROBE_STATS), *TASK_FEATURES)


class ProbeCollector:
    """Probe callback for a SparsePlan: keeps per-layer stats where they were computed (no host
    sync per layer), copies them all to the host in one transfer when first read, and pools them
    by mean over layers."""

    def __init__(self):
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self._host: np.ndarray | None = None   # [layers, stats, B] once read
        self._copy: tuple[torch.Tensor, torch.cuda.Event] | None = None   # a copy under way (pinned, event)

    def __call__(self, layer: int, stats: dict[str, torch.Tensor]) -> None:
        self.layers[layer] = {k: v.detach() for k, v in stats.items()}
        self._host, self._copy = None, None

    def _stacked(self) -> torch.Tensor:
        return torch.stack([torch.stack([st[s].float() for s in PROBE_STATS]) for st in self.layers.values()])

    def start_copy(self) -> None:
        """Start the device-to-host copy without waiting (CUDA: into pinned memory, with an event):
        `host()` then waits for these statistics only, not for the kernels queued after them."""
        stacked = self._stacked()
        if not stacked.is_cuda:
            self._host = stacked.numpy()
            return
        pinned = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        pinned.copy_(stacked, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._copy = (pinned, done)

    def host(self) -> np.ndarray:
        """[layers, PROBE_STATS, B] float32 on the host (one device-to-host copy)."""
        if self._host is None and self._copy is not None:
            pinned, done = self._copy
            done.synchronize()
            self._host, self._copy = pinned.numpy(), None
        if self._host is None:
            self._host = self._stacked().cpu().numpy()
        return self._host

    def pooled(self, row: int) -> dict[str, float]:
        """{stat: mean over probe layers} for one batch row."""
        if not self.layers:
            raise RuntimeError("no probe layer ran: probe_layers must name layers that ran")
        values = self.host()[:, :, row].astype(np.float64)
        return {s: float(values[:, i].mean()) for i, s in enumerate(PROBE_STATS)}


def _distinct(values: np.ndarray) -> int:
    """Number of distinct values: a count table for small non-negative ids, a hash table otherwise
    (both exact; neither sorts)."""
    if values.size and values.dtype == np.int32 and values.min() >= 0 and values.max() < 1 << 22:
        return int(np.count_nonzero(np.bincount(values)))
    return len(pd.unique(values))


def text_statistics(token_ids: Sequence[int] | np.ndarray) -> dict[str, float]:
    """zlib ratio (level `ZLIB_LEVEL`) of the int32 ids, distinct-token share, repeated-bigram share.
    The hook computes them on a worker while the probe layers run; zlib (GIL released) dominates:
    ~1.7 ms at 32K tokens here (level 6 took ~12 ms)."""
    ids = np.asarray(token_ids, dtype=np.int32)
    raw = ids.tobytes()
    n = max(len(ids), 1)
    pairs = (ids[:-1].astype(np.int64) << 32) | ids[1:].astype(np.int64)
    return {
        "compression_ratio": len(zlib.compress(raw, ZLIB_LEVEL)) / max(len(raw), 1),
        "unique_token_ratio": _distinct(ids) / n,
        "repeated_bigram_ratio": 1.0 - _distinct(pairs) / max(len(ids) - 1, 1),
    }


def compute_features(token_ids: Sequence[int], probe: dict[str, float], task: str | None,
                     text_stats: dict[str, float] | None = None) -> dict[str, float]:
    """All features of one request, keyed by FEATURE_NAMES (same order). `text_stats`: the result of
    `text_statistics(token_ids)` if the caller computed it already (the hook does, on a worker
    thread while the probe layers run)."""
    task = task if task in TASK_TYPES else UNKNOWN_TASK
    feats = {"log_length": math.log(max(len(token_ids), 1))}
    feats.update(text_statistics(token_ids) if text_stats is None else {k: text_stats[k] for k in TEXT_STATS})
    feats.update({f"probe_{s}": float(probe[s]) for s in PROBE_STATS})
    feats.update({name: float(name == f"task_{task}") for name in TASK_FEATURES})
    return {name: feats[name] for name in FEATURE_NAMES}


def feature_vector(features: dict[str, float]) -> np.ndarray:
    return np.array([features[name] for name in FEATURE_NAMES], dtype=np.float32)
