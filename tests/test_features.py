"""Features: finite, ordered, and equal whether computed in the labeling batch or for one request
alone with no levels set (the situation of the inference hook)."""
import numpy as np
import pandas as pd
import pytest
import torch

from controller.learning.config import ControllerJobConfig
from data.config import load_config
from data.features import FEATURE_NAMES, FEATURE_VERSION, ProbeCollector, compute_features, feature_vector, text_statistics
from data.labeling import Labeler, build_samples
from data.tasks import prompt_ids
from sparse_kernels import SparsePlan, enable_sparse_attention, use_plan


def test_labeling_features_equal_single_request_features(tiny_lm):
    job = load_config(ControllerJobConfig, "configs/test_tiny.yaml", ["data.samples_per_length=1"]).label_job()
    labeler = Labeler(tiny_lm, job)
    for sample in build_samples(job.data, tiny_lm.tokenizer):
        rows = labeler.label_sample(sample)
        offline = {n: rows[0][f"f_{n}"] for n in FEATURE_NAMES}
        assert all(r[f"f_{n}"] == offline[n] for r in rows for n in FEATURE_NAMES)
        # one request, no level decided yet: the probe layers alone
        ids = prompt_ids(tiny_lm.tokenizer, sample)
        collector = ProbeCollector()
        sp = job.sparse
        plan = SparsePlan(levels=None, selection=sp.selection(), dense_layers=frozenset(sp.dense_layers),
                          probe_layers=frozenset(sp.probe_layers), on_probe=collector, probe_window=sp.probe_window)
        enable_sparse_attention(tiny_lm.model)
        with torch.no_grad(), use_plan(plan):
            tiny_lm.model(torch.tensor([ids]))
        online = compute_features(ids, collector.pooled(0), sample.task)
        np.testing.assert_allclose(feature_vector(online), feature_vector(offline), rtol=1e-5, atol=1e-6)


def test_feature_order_task_one_hot_and_unknown():
    probe = {k.removeprefix("probe_"): 0.5 for k in FEATURE_NAMES if k.startswith("probe_")}
    f = compute_features(list(range(100)) * 3, probe, "vt")
    assert list(f) == list(FEATURE_NAMES) and np.isfinite(feature_vector(f)).all()
    assert f["task_vt"] == 1.0 and sum(v for k, v in f.items() if k.startswith("task_")) == 1.0
    g = compute_features([1, 2, 3], probe, "something-new")
    assert g["task_unknown"] == 1.0
    assert f["log_length"] == pytest.approx(np.log(300))


def test_text_statistics_see_repetition():
    rng = np.random.default_rng(0)
    varied = text_statistics(rng.integers(0, 40000, 2000).tolist())
    repeated = text_statistics([5, 6, 7, 8] * 500)
    assert repeated["compression_ratio"] < varied["compression_ratio"]
    assert repeated["repeated_bigram_ratio"] > varied["repeated_bigram_ratio"]
    assert repeated["unique_token_ratio"] < varied["unique_token_ratio"]


def test_text_statistics_equal_their_plain_python_definition():
    import random
    import zlib

    import numpy as np

    from data.features import text_statistics
    rng = random.Random(0)
    for n, vocab in ((1, 60), (2, 60), (17, 60), (500, 60), (3000, 49152), (3000, 1 << 23)):
        ids = [rng.randrange(0, vocab) for _ in range(n)]
        raw = np.asarray(ids, dtype=np.int32).tobytes()
        want = {"compression_ratio": len(zlib.compress(raw, 1)) / len(raw),
                "unique_token_ratio": len(set(ids)) / n,
                "repeated_bigram_ratio": 1.0 - len(set(zip(ids[:-1], ids[1:]))) / max(n - 1, 1)}
        assert text_statistics(ids) == want
        assert text_statistics(np.asarray(ids)) == want


@pytest.mark.parametrize("forms", ["[classic]", "[classic, varied]"])
def test_backfill_recomputes_the_labeling_features_and_keeps_the_labels(tiny_lm, tmp_path, forms):
    """A store whose feature columns are stale gets the features labeling computed (same function,
    forward stopped after the last probe layer); every other column is unchanged. Also for a store
    in several surface forms, whose ids carry the form set (`...-s0-varied`, as store v2)."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.backfill import backfill_store

    from data.features import FEATURE_NAMES as NAMES
    from data.runner import run_labeling
    from data.store import LabelStore

    job = load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                      [f"labeling.out={tmp_path / 's'}", f"data.forms={forms}"]).label_job()
    store = run_labeling(job, tiny_lm)
    before = store.table()
    assert before["sample_id"].str.endswith("-varied").any() == ("varied" in forms)
    for shard in store.shards():   # make the features stale
        df = pq.read_table(shard).to_pandas()
        df["f_probe_recall90_mean"] = -1.0
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), shard)
    meta = store.meta()
    meta["identity"]["feature_version"] = 0
    (store.root / "meta.json").write_text(_json.dumps(meta))
    record = backfill_store(str(store.root), "cpu", "float32", log=lambda *_: None)
    after = LabelStore(store.root).table()
    cols = [f"f_{n}" for n in NAMES]
    np.testing.assert_allclose(after[cols].to_numpy(float), before[cols].to_numpy(float), rtol=1e-4, atol=1e-5)
    other = [c for c in before.columns if not c.startswith("f_") and c not in ("outputs",)]
    pd.testing.assert_frame_equal(after[other], before[other])
    new_meta = LabelStore(store.root).meta()
    assert new_meta["identity"]["feature_version"] == FEATURE_VERSION and new_meta["features_backfilled"][-1] == record
    assert not list(store.root.glob("shards.*"))


def test_text_only_backfill_keeps_the_probes_and_recomputes_the_token_statistics(tiny_lm, tmp_path):
    """`--text-only`: the stored probe statistics stay as they are (even stale ones: no forward runs)
    and the token-id statistics are recomputed; a store whose prompts no longer regenerate is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.backfill import backfill_store
    from data.errors import UserError
    from data.features import FEATURE_NAMES as NAMES
    from data.features import TEXT_STATS
    from data.runner import run_labeling
    from data.store import LabelStore

    job = load_config(ControllerJobConfig, "configs/test_tiny.yaml", [f"labeling.out={tmp_path / 's'}"]).label_job()
    store = run_labeling(job, tiny_lm)
    before = store.table()
    for shard in store.shards():   # stale probe column (kept) and stale compression ratio (recomputed)
        df = pq.read_table(shard).to_pandas()
        df["f_probe_recall90_mean"], df["f_compression_ratio"] = -1.0, -2.0
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), shard)
    record = backfill_store(str(store.root), "cpu", "float32", log=lambda *_: None, text_only=True)
    after = LabelStore(store.root).table()
    assert (after["f_probe_recall90_mean"] == -1.0).all() and record["recomputed"] == "token-id statistics only"
    text = [f"f_{n}" for n in TEXT_STATS]
    np.testing.assert_allclose(after[text].to_numpy(float), before[text].to_numpy(float), rtol=0, atol=1e-12)
    kept = [f"f_{n}" for n in NAMES if n not in TEXT_STATS and n != "probe_recall90_mean"]
    np.testing.assert_array_equal(after[kept].to_numpy(float), before[kept].to_numpy(float))
    for shard in store.shards():   # a token statistic that the regenerated prompt does not reproduce
        df = pq.read_table(shard).to_pandas()
        df["f_unique_token_ratio"] += 0.01
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), shard)
    with pytest.raises(UserError, match="regenerates to other token ids"):
        backfill_store(str(store.root), "cpu", "float32", log=lambda *_: None, text_only=True)
