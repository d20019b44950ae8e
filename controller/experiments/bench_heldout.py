"""`decided_heldout` benchmark rows: the hook with the controller's own decisions on real held-out
requests of a label store, timed against the best dense path, with the share of its decisions that
the store's labels call unsafe.

Owns `heldout_requests` (which requests, and their prompts regenerated from the store's plan) and
`decided_heldout_rows`. Held out means: every request of the store, except when it is the store the
checkpoint was trained on, then only its test split (groups the controller never saw in training,
validation or calibration). Per target length N, a row: `ms` (mean over its requests of the hook's
own call), `ms_dense` (mean of the best dense path: the unhooked model, or for models with
sliding-window layers the faster of that and those layers over their window), `ms_unhooked`,
`speedup` (sum of dense / sum of hook), `level` (mean decided level), `unsafe_rate` (decided above
the request's label under the checkpoint's criterion), `n_requests`, and `bound` (the speedup that
forcing the mean decided level gives at N, interpolated over this run's forced rows).
Imports `data` and `controller` modules; nothing imports it but the benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from data.criteria import apply_criterion, describe_criterion, resolved
from data.errors import UserError
from data.store import LabelStore, sample_labels

from controller.learning.dataset import SPLITS, split_groups


def _is_training_store(root: str, ckpt_dir: str | Path, rec: dict) -> bool:
    from controller.learning.pipeline import recorded_stores
    train = recorded_stores(rec, ckpt_dir).get("the checkpoint's training label store")
    return train is not None and Path(train).resolve() == Path(root).resolve()


def heldout_requests(root: str, ckpt, ckpt_dir: str | Path, lengths: tuple[int, ...], per_length: int, tokenizer
                     ) -> tuple[dict[int, list[tuple[str, list[int]]]], "pd.Series", dict]:
    """({target length: [(sample id, prompt ids)]}, each request's label under the checkpoint's
    criterion, that criterion), the first `per_length` held-out requests per length in plan order."""
    from data.config import DataConfig, from_dict
    from data.labeling import plan_samples, realize
    from data.tasks import prompt_ids
    store = LabelStore(root)
    if not store.root.is_dir():
        raise UserError(f"--heldout {root}: no such label store; label it first (python train.py --config ...)")
    table, meta = store.table(), store.meta()
    crit = resolved(table, ckpt.record["criterion"])
    labels = sample_labels(apply_criterion(table, crit)).set_index("sample_id")["label"]
    dense = table[table["level"] == 0.0].drop_duplicates("sample_id")
    if _is_training_store(root, ckpt_dir, ckpt.record):
        split = ckpt.record["split"]
        which = split_groups(dense["group"].to_numpy(), (split["train"], split["val"], split["calibration"]), split["seed"])
        dense = dense.iloc[which[SPLITS[-1]]]
    index = dense["sample_id"].str.extract(r"-(\d+)-s\d+(?:-\w+)?$")[0].dropna().astype(int)
    data = dict(meta["identity"]["data"], samples_per_length=int(index.max()) + 1 if len(index) else 1)
    plan = {p.sample_id: p for p in plan_samples(from_dict(DataConfig, data, "the store's data"))}
    chosen = {}
    for n in lengths:
        rows = dense[dense["target_length"] == n]
        ids = [sid for sid in rows["sample_id"] if sid in plan][:per_length]
        chosen[n] = [(sid, prompt_ids(tokenizer, realize(plan[sid], tokenizer), data.get("chat_template", True)))
                     for sid in ids]
    if not any(chosen.values()):
        raise UserError(f"--heldout {root}: no held-out requests at lengths {list(lengths)} (the store has "
                        f"{sorted(int(x) for x in dense['target_length'].unique())}); pick lengths it holds")
    return chosen, labels, crit


def _bound(rows: list[dict], n: int, level: float) -> float | None:
    """Speedup of forcing `level` at length `n`: the forced rows of this run at the measured length
    nearest n, interpolated linearly over levels (1.0 at level 0)."""
    forced = [r for r in rows if r.get("mode") == "forced"]
    if not forced or level <= 0:
        return 1.0 if level <= 0 else None
    near = min({r["N"] for r in forced}, key=lambda m: abs(np.log(m / n)))
    at = sorted((r["level"], r["speedup"]) for r in forced if r["N"] == near)
    return float(np.interp(level, [0.0] + [a for a, _ in at], [1.0] + [s for _, s in at]))


def decided_heldout_rows(lm, handle, ckpt, requests: dict, labels, crit: dict, rows: list[dict], measure) -> list[dict]:
    """One `decided_heldout` row per target length; `measure(modes, n)` times alternating calls."""
    from sparse_kernels import sliding_window_of
    from controller.experiments.bench_calls import _forced_call, _past_warmup
    out = []
    for n_target, reqs in requests.items():
        if not reqs:
            continue
        sums, levels, unsafe, tokens = {"own": 0.0, "dense": 0.0, "unhooked": 0.0}, [], [], []
        for sid, ids in reqs:
            x = torch.tensor([ids], device=lm.device)
            call = lambda x=x: lm.model(input_ids=x, logits_to_keep=1)  # noqa: E731
            modes = {"unhooked": (call, handle.detached)}
            if sliding_window_of(lm.model) is not None:   # the best dense: those layers over their window
                modes["window"] = (_forced_call(handle, call, 0.0, True, False, False), handle.paused)
            modes["own"] = (call, contextlib.nullcontext)   # last: `last_decisions` are its
            _past_warmup(handle)
            t = {k: ms for k, (ms, _) in measure(modes, len(ids)).items()}
            d = handle.last_decisions[0]
            sums["own"] += t["own"]
            sums["unhooked"] += t["unhooked"]
            sums["dense"] += min(t["unhooked"], t.get("window", np.inf))
            levels.append(float(d.level))
            unsafe.append(float(d.level) > float(labels.get(sid, 0.0)) + 1e-9)
            tokens.append(len(ids))
        k, mean_level = len(reqs), float(np.mean(levels))
        row = {"N": int(n_target), "mode": "decided_heldout", "level": round(mean_level, 4),
               "ms": round(sums["own"] / k, 3), "ms_dense": round(sums["dense"] / k, 3),
               "ms_unhooked": round(sums["unhooked"] / k, 3), "speedup": round(sums["dense"] / sums["own"], 3),
               "unsafe_rate": float(np.mean(unsafe)), "n_requests": k, "n_tokens_mean": float(np.mean(tokens)),
               "levels": levels, "bound": _bound(rows, int(np.mean(tokens)), mean_level),
               "criterion": describe_criterion(crit)}
        print(row, flush=True)
        out.append(row)
    return out
