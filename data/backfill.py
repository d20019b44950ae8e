"""Recompute a label store's features with this code's feature version, without relabeling.

Labels (the sparse runs, decoding, NLLs) do not depend on the features, and the features depend
only on the model and the prompt. So when FEATURE_VERSION changes, a store is brought up to date by
running each stored prompt through the model's dense layers up to the last probe layer (the forward
stops there), computing the features with `features.compute_features` (the function labeling and
the hook use), and rewriting the shards with the new feature columns. The new shards are written
into a folder inside the store and swapped in with the metadata in steps that a rerun finishes
after a kill at any point (`store.finish_swap`); it holds the store's LOCK throughout.

  python -m data.backfill --store data/labels/smollm2-135m/v1 [--device cpu] [--dtype bfloat16] [--text-only]

`--text-only` (a change of the token-id statistics' definition alone): no forward at all; the
stored probe statistics are kept and only `features.text_statistics` is recomputed from the
regenerated prompt (the unchanged statistics must come back equal: that checks the regeneration).

The metadata records the backfill (device, dtype, versions, how far the recomputed old features
are from the stored ones). Owns `backfill_store`. Imports `sparse_kernels` and lower `data`
modules; never `controller`.
"""
from __future__ import annotations

import datetime
import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from sparse_kernels import SparsePlan, enable_sparse_attention, use_plan

from .config import DataConfig, SparseConfig, from_dict
from .errors import ArgumentParser, UserError, error_line, doc_summary
from .features import FEATURE_NAMES, FEATURE_VERSION, TEXT_STATS, ProbeCollector, compute_features, text_statistics
from .labeling import plan_samples, realize
from .models import load_model, same_weights
from .store import BUILD_DIR, LabelStore, StoreLock, finish_swap, swap_in_shards
from .tasks import prompt_ids
from .tasks.base import parse_generated_sample_id


class _ProbesDone(Exception):
    """Raised by the probe callback after the last probe layer: the rest of the forward is not needed."""


def probe_features(lm, sparse: SparseConfig, ids: list[int], task: str) -> dict[str, float]:
    """The features of one prompt from a dense forward that stops after the last probe layer."""
    collector = ProbeCollector()
    last = max(sparse.probe_layers)

    def on_probe(layer, stats):
        collector(layer, stats)
        if layer == last:
            raise _ProbesDone

    plan = SparsePlan(levels=None, selection=sparse.selection(), dense_layers=frozenset(sparse.dense_layers),
                      backend=sparse.backend, probe_layers=frozenset(sparse.probe_layers), on_probe=on_probe,
                      probe_window=sparse.probe_window)
    with torch.no_grad(), use_plan(plan):
        try:
            lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
        except _ProbesDone:
            pass
    return compute_features(ids, collector.pooled(0), task)


def _samples_of(meta: dict, ids: set[str], tokenizer) -> dict:
    data = dict(meta["identity"]["data"])
    parsed = (parse_generated_sample_id(s) for s in ids)
    indices = [p[2] for p in parsed if p is not None]
    data["samples_per_length"] = max(indices, default=0) + 1   # every generated index the store holds
    cfg = from_dict(DataConfig, data)
    plan = [p for p in plan_samples(cfg) if p.sample_id in ids]
    return {p.sample_id: p for p in plan}


def _text_only_features(stored, ids: list[int]) -> dict[str, float]:
    """The stored features with the token-id statistics recomputed (no forward)."""
    feats = {name: float(stored[f"f_{name}"]) for name in FEATURE_NAMES if f"f_{name}" in stored.index}
    missing = sorted(set(FEATURE_NAMES) - set(feats) - set(TEXT_STATS))
    if missing:
        raise UserError(f"--text-only keeps the stored features, but the store has no column f_{missing[0]}; "
                        "run the backfill without --text-only")
    return {**feats, **text_statistics(ids)}


def backfill_store(root: str, device: str = "cpu", dtype: str | None = None, log=print, text_only: bool = False) -> dict:
    """Recompute every request's features (`text_only`: the token-id statistics only, from the
    stored probe statistics); returns the backfill record written into meta.json. Holds the store's
    lock throughout (a live labeling run is refused in one line, and cannot start meanwhile); first
    finishes a backfill that was killed while swapping its shards in (then that one's record is
    returned when it already brought the store to this feature version)."""
    LabelStore(root).meta()   # the one-line error for a folder that is not a store, before the lock
    with StoreLock(root):
        done = finish_swap(root)
        meta = LabelStore(root).meta()
        if done == "finished" and meta["identity"].get("feature_version") == FEATURE_VERSION:
            log(f"backfill: finished the interrupted backfill of {root}")
            return meta["features_backfilled"][-1]
        return _backfill(root, device, dtype, log, text_only)


def _backfill(root: str, device: str, dtype: str | None, log, text_only: bool) -> dict:
    store = LabelStore(root)
    meta = store.meta()
    table = store.table()
    first = table[table["level"] == 0.0].set_index("sample_id")
    dtype = dtype or meta["identity"]["dtype"].removeprefix("torch.")
    lm = load_model(meta["model_name"], dtype, device, meta["identity"]["model"].get("rope"))
    if not same_weights(lm.fingerprint, meta["identity"]["model"]):
        raise UserError(f"model {meta['model_name']} here is not the store's model; backfill where it is available")
    enable_sparse_attention(lm.model)
    sparse = from_dict(SparseConfig, meta["identity"]["sparse"])
    planned = _samples_of(meta, set(first.index), lm.tokenizer)
    missing = sorted(set(first.index) - set(planned))
    if missing:
        raise UserError(f"{root}: {len(missing)} stored requests (e.g. {missing[0]}) cannot be regenerated from its data config")
    features, old_diff = {}, []
    for i, sid in enumerate(first.index):
        sample = realize(planned[sid], lm.tokenizer)
        ids = prompt_ids(lm.tokenizer, sample, meta["identity"]["data"]["chat_template"])
        if len(ids) != int(first.loc[sid, "n_tokens"]):
            raise UserError(f"{root}: request {sid} regenerates to {len(ids)} tokens, stored {first.loc[sid, 'n_tokens']}")
        features[sid] = (_text_only_features(first.loc[sid], ids) if text_only
                         else probe_features(lm, sparse, ids, sample.task))
        old = [c for c in first.columns if c.startswith("f_") and c[2:] in features[sid]
               and not (text_only and c == "f_compression_ratio")]
        old_diff.append(max(abs(features[sid][c[2:]] - float(first.loc[sid, c])) for c in old) if old else 0.0)
        if text_only and old_diff[-1] > 1e-9:   # the kept probe statistics would belong to another prompt
            raise UserError(f"{root}: request {sid} regenerates to other token ids than were labeled "
                            f"(a token-id statistic moved by {old_diff[-1]:.3g}); run the backfill without --text-only")
        if (i + 1) % 100 == 0:
            log(f"backfill: {i + 1}/{len(first)} requests")
    record = {"feature_version": FEATURE_VERSION, "device": device, "dtype": dtype, "requests": len(features),
              "recomputed": "token-id statistics only" if text_only else "every feature",
              "max_abs_diff_of_recomputed_old_features": {"median": float(np.median(old_diff)), "max": float(np.max(old_diff))},
              "torch": torch.__version__, "transformers": transformers.__version__,   # the tokenizer regenerated the prompts
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    _rewrite(store, meta, features, record)
    return record


def _rewrite(store: LabelStore, meta: dict, features: dict[str, dict], record: dict) -> None:
    """New shards built in a folder inside the store, then swapped in together with the metadata
    (`store.swap_in_shards`: a kill at any point is finished or undone by a rerun)."""
    new_dir = store.root / BUILD_DIR
    shutil.rmtree(new_dir, ignore_errors=True)
    new_dir.mkdir()
    for shard in store.shards():
        df = pq.read_table(shard).to_pandas()
        df = df.drop(columns=[c for c in df.columns if c.startswith("f_")])
        for name in FEATURE_NAMES:
            df[f"f_{name}"] = df["sample_id"].map(lambda s, n=name: features[s][n])
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), new_dir / shard.name, compression="zstd")
    meta = json.loads(json.dumps(meta))
    meta["identity"].update(feature_version=FEATURE_VERSION, feature_names=list(FEATURE_NAMES))
    meta.setdefault("features_backfilled", []).append(record)
    swap_in_shards(store.root, new_dir, {"store_version": meta.get("store_version", 1), **meta})


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m data.backfill", description=doc_summary(__doc__))
    p.add_argument("--store", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", help="default: the dtype the store was labeled in")
    p.add_argument("--text-only", action="store_true",
                   help="recompute only the token-id statistics and keep the stored probe statistics (no forward)")
    args = p.parse_args(argv)
    try:
        record = backfill_store(args.store, args.device, args.dtype, text_only=args.text_only)
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    print(json.dumps(record))
    print(args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
