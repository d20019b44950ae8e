"""Labeled requests as arrays: what a guarantee is computed on and a controller is trained on.

Owns `LabelArrays` (one row per request: features, raw `safe` per grid level, the monotone label
index, kept / causal attention blocks per level, task scores) and `concat_arrays`. Built from a label
store by `controller.learning.dataset`. Imports `data.errors` and numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.errors import UserError


@dataclass
class LabelArrays:
    sample_ids: np.ndarray      # [n] str
    groups: np.ndarray          # [n] str, the generated document
    tasks: np.ndarray           # [n] str
    n_tokens: np.ndarray        # [n] int
    target_length: np.ndarray   # [n] int
    features: np.ndarray        # [n, F] float32, FEATURE_NAMES order
    levels: np.ndarray          # [L] grid, levels[0] == 0
    safe: np.ndarray            # [n, L] bool, the criterion at each level (raw, not closed)
    kept: np.ndarray            # [n, L] attention blocks computed, all layers
    causal: np.ndarray          # [n] causal blocks of dense attention, all layers
    score: np.ndarray           # [n, L] task score of the greedy answer
    achieved: np.ndarray        # [n, L] achieved sparsity on sparse layers
    forms: np.ndarray | None = None   # [n] str, the surface form ('code/p2/chat'; '' for read requests)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def label_index(self) -> np.ndarray:
        """[n] index of the largest level such that it and every lower level are safe."""
        unsafe = ~self.safe
        unsafe[:, 0] = False
        first_unsafe = np.where(unsafe.any(1), unsafe.argmax(1), self.safe.shape[1])
        return first_unsafe - 1

    def subset(self, idx: np.ndarray) -> "LabelArrays":
        return LabelArrays(**{k: (v if k == "levels" or v is None else v[idx]) for k, v in self.__dict__.items()})


def concat_arrays(parts: list[LabelArrays]) -> LabelArrays:
    """Rows of several LabelArrays on the same grid, one after the other."""
    if any(not np.array_equal(p.levels, parts[0].levels) for p in parts):
        raise UserError("cannot join label arrays made on different grids")
    def joined(k, v):
        if k == "levels":
            return v
        if any(getattr(p, k) is None for p in parts):
            return None
        return np.concatenate([getattr(p, k) for p in parts])
    return LabelArrays(**{k: joined(k, v) for k, v in parts[0].__dict__.items()})
