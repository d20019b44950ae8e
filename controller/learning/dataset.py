"""Label-store rows as per-request arrays, and grouped splits.

Owns `arrays_from_store` (a store's rows as `LabelArrays`, `controller.guarantee.arrays`) and
`split_groups` (train / val / calibration / test by a hash of each request's generated document,
so no document is in two splits and a growing store keeps old assignments). Imports `data` and
`controller.guarantee.arrays`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import UserError
from data.features import FEATURE_NAMES, FEATURE_VERSION
from data.store import LabelStore, apply_criterion, criterion_dict, describe_criterion, missing_outputs

from controller.guarantee.arrays import LabelArrays, concat_arrays

SPLITS = ("train", "val", "calibration", "test")


def _pivot(df: pd.DataFrame, column: str, ids: pd.Index, levels: np.ndarray) -> np.ndarray:
    return df.pivot(index="sample_id", columns="level", values=column).reindex(index=ids, columns=levels).to_numpy()


def arrays_from_frame(df: pd.DataFrame) -> LabelArrays:
    """Per-request arrays from store rows that already carry `safe` (see `apply_criterion`)."""
    levels = np.array(sorted(df["level"].unique()), dtype=np.float64)
    if levels[0] != 0.0:
        raise UserError("label store has no dense (level 0) rows; it cannot define safety")
    first = df[df["level"] == 0.0].set_index("sample_id").sort_index()
    ids = first.index
    counts = df.groupby("sample_id")["level"].nunique().reindex(ids)
    if (counts != len(levels)).any():
        raise UserError(f"{int((counts != len(levels)).sum())} samples lack some grid levels; resume the labeling run")
    return LabelArrays(
        sample_ids=ids.to_numpy(str), groups=first["group"].to_numpy(str), tasks=first["task"].to_numpy(str),
        n_tokens=first["n_tokens"].to_numpy(int), target_length=first["target_length"].to_numpy(int),
        features=first[[f"f_{n}" for n in FEATURE_NAMES]].to_numpy(np.float32), levels=levels,
        safe=_pivot(df, "safe", ids, levels).astype(bool), kept=_pivot(df, "kept_blocks_all", ids, levels),
        causal=first["causal_blocks_all"].to_numpy(np.float64), score=_pivot(df, "score", ids, levels),
        achieved=_pivot(df, "achieved_sparsity", ids, levels),
        forms=first["form"].fillna("").to_numpy(str) if "form" in first else np.full(len(ids), "", dtype=object))


def check_feature_version(meta: dict, where: str, root: str | Path | None = None) -> None:
    identity = meta.get("identity", {})
    if identity.get("feature_version") != FEATURE_VERSION or list(identity.get("feature_names", [])) != list(FEATURE_NAMES):
        fix = (f"bring its features up to date with `python -m data.backfill --store {root}` (no relabeling)"
               if root is not None else "relabel it with this code")
        raise UserError(f"{where} was made with feature version {identity.get('feature_version')}, this code "
                        f"computes version {FEATURE_VERSION}; {fix}")


class MissingOutputs(UserError):
    """A store judged by `gold` holds requests without reference outputs (labeled from prompts)."""


def arrays_from_store(root: str | Path, criterion=None) -> tuple[LabelArrays, dict]:
    store = LabelStore(root)
    if not store.root.is_dir():
        raise UserError(f"label store {root} does not exist; run labeling first or fix the path")
    meta = store.meta()
    check_feature_version(meta, f"label store {root}", root)
    crit = criterion_dict(criterion if criterion is not None else meta["criterion"])
    table = store.table()
    missing = missing_outputs(table) if crit["name"] == "gold" else 0
    if missing:
        raise MissingOutputs(f"label store {root}: {missing} requests have no reference outputs, which the gold criterion "
                             "needs; use the label-free criterion (--criterion fidelity or criterion.name=fidelity)")
    return arrays_from_frame(apply_criterion(table, crit)), meta


def arrays_from_stores(roots: list[str], criterion=None) -> tuple[LabelArrays, dict]:
    """The rows of several stores labeled alike (model, dtype, sparse settings, grid, features; only
    the data they were labeled from may differ), judged by one criterion; the first store's meta."""
    arrays, meta = arrays_from_store(roots[0], criterion)
    same = {k: v for k, v in meta["identity"].items() if k != "data"}
    parts = [arrays]
    for root in roots[1:]:
        more, other = arrays_from_store(root, criterion)
        differ = sorted(k for k in set(same) | set(other["identity"]) - {"data"}
                        if same.get(k) != other["identity"].get(k))
        if differ:
            raise UserError(f"label store {root} was labeled differently from {roots[0]} ({', '.join(differ)}); "
                            "only stores of the same model, sparse settings and grid join")
        if set(more.sample_ids) & set(arrays.sample_ids):
            raise UserError(f"label stores {roots[0]} and {root} share requests; join stores of different requests")
        parts.append(more)
    return concat_arrays(parts), meta


def store_hash(root: str | Path) -> str:
    """sha256 over the store's identity and shard contents (what a checkpoint was trained on)."""
    store = LabelStore(root)
    h = hashlib.sha256(json.dumps(store.meta().get("identity", {}), sort_keys=True).encode())
    for shard in store.shards():
        h.update(shard.name.encode())
        h.update(shard.read_bytes())
    return h.hexdigest()


def split_groups(groups: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """{split: row indices}; a group's split depends only on its name and the seed."""
    edges = np.cumsum(fractions)
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{g}".encode()).digest()[:8], "big") / 2**64
                  for g in groups])
    which = np.searchsorted(edges, u, side="right")
    return {name: np.flatnonzero(which == i) for i, name in enumerate(SPLITS)}


def requests_summary(cal: LabelArrays, criterion: dict) -> dict:
    """What a record says about the requests a checkpoint was calibrated on."""
    return {"requests": len(cal), "criterion": criterion, "criterion_text": describe_criterion(criterion),
            "tokens": [int(cal.n_tokens.min()), int(cal.n_tokens.max())],
            "tasks": {str(t): int(c) for t, c in zip(*np.unique(cal.tasks, return_counts=True))}}
