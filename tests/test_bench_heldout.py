"""The benchmark's `decided_heldout` rows, on CPU (mechanics only: timings are taken on the GPU):
real held-out requests of a label store, the controller's own decisions, their unsafe rate."""
import shutil

import numpy as np
import pytest

from controller.experiments.bench_heldout import heldout_requests
from controller.experiments.benchmark import bench_end_to_end
from controller.learning.dataset import SPLITS, split_groups
from controller.runtime.checkpoint import load_checkpoint
from data.criteria import apply_criterion, resolved
from data.errors import UserError
from data.store import sample_labels


def _labels(store, ckpt):
    table = store.table()
    return sample_labels(apply_criterion(table, resolved(table, ckpt.record["criterion"]))).set_index("sample_id")["label"]


def test_heldout_requests_are_the_test_split_of_the_training_store_and_all_of_another(tiny_trained, tiny_lm, tmp_path):
    _, store, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    table = store.table()
    dense = table[table["level"] == 0].drop_duplicates("sample_id")
    split = ckpt.record["split"]
    which = split_groups(dense["group"].to_numpy(), (split["train"], split["val"], split["calibration"]), split["seed"])
    test_ids = set(dense["sample_id"].iloc[which[SPLITS[-1]]])
    lengths = tuple(sorted(int(n) for n in dense["target_length"].unique()))
    reqs, labels, _ = heldout_requests(str(store.root), ckpt, ckpt_dir, lengths, 100, tiny_lm.tokenizer)
    got = {sid for rs in reqs.values() for sid, _ in rs}
    assert got == test_ids and len(got) < len(dense)          # never a request the controller trained on
    for n, rs in reqs.items():                                 # prompts regenerated from the store's plan
        for sid, ids in rs:
            assert dense.set_index("sample_id").loc[sid, "target_length"] == n
            assert dense.set_index("sample_id").loc[sid, "n_tokens"] == len(ids)
    assert labels.equals(_labels(store, ckpt))
    other = tmp_path / "other_store"
    shutil.copytree(store.root, other)
    reqs, _, _ = heldout_requests(str(other), ckpt, ckpt_dir, lengths, 100, tiny_lm.tokenizer)
    assert {sid for rs in reqs.values() for sid, _ in rs} == set(dense["sample_id"])   # unseen store: all of it
    with pytest.raises(UserError, match="no held-out requests at lengths"):
        heldout_requests(str(other), ckpt, ckpt_dir, (99999,), 3, tiny_lm.tokenizer)
    with pytest.raises(UserError, match="no such label store"):
        heldout_requests(str(tmp_path / "none"), ckpt, ckpt_dir, lengths, 3, tiny_lm.tokenizer)


def test_decided_heldout_rows_report_decisions_their_unsafe_rate_and_the_forced_bound(tiny_trained, tmp_path):
    _, store, ckpt_dir, _, _ = tiny_trained
    other = tmp_path / "held"
    shutil.copytree(store.root, other)
    ckpt = load_checkpoint(ckpt_dir)
    labels = _labels(store, ckpt)
    lengths = tuple(sorted(int(n) for n in store.table()["target_length"].unique()))
    rows, _ = bench_end_to_end(str(ckpt_dir), "tiny-random-llama", lengths=(300,), device="cpu", dtype="float32",
                               heldout=(str(other), lengths, 3))
    held = [r for r in rows if r["mode"] == "decided_heldout"]
    assert [r["N"] for r in held] == list(lengths)
    grid = set(ckpt.levels.tolist())
    for r in held:
        assert r["n_requests"] == 3 and len(r["levels"]) == 3 and set(r["levels"]) <= grid
        assert r["ms"] > 0 and r["ms_dense"] > 0 and r["ms_dense"] <= r["ms_unhooked"] + 1e-9
        assert r["level"] == pytest.approx(np.mean(r["levels"]), abs=1e-4)
        assert 0.0 <= r["unsafe_rate"] <= 1.0 and r["bound"] is not None and r["bound"] > 0
        assert "criterion" in r and r["speedup"] == pytest.approx(r["ms_dense"] / r["ms"], rel=0.01)
    # the unsafe rate is the decisions against the store's labels, request by request
    table = store.table()
    dense = table[table["level"] == 0].drop_duplicates("sample_id")
    for r in held:
        ids = dense[dense["target_length"] == r["N"]]["sample_id"].tolist()[:3]
        expect = np.mean([lv > labels[sid] + 1e-9 for lv, sid in zip(r["levels"], ids)])
        assert r["unsafe_rate"] == pytest.approx(expect)


def test_unsafe_rate_counts_sparse_decisions_above_the_label(tiny_trained, tiny_lm, tmp_path):
    """Without a break-even table the hook runs the net's own sparse decisions at these lengths:
    the rows must price and judge them request by request."""
    from controller.experiments.bench_heldout import decided_heldout_rows
    from controller.experiments.benchmark import _measure_alternating
    from controller.runtime.hook import attach
    _, store, ckpt_dir, _, _ = tiny_trained
    other = tmp_path / "held"
    shutil.copytree(store.root, other)
    ckpt = load_checkpoint(ckpt_dir)
    lengths = tuple(sorted(int(n) for n in store.table()["target_length"].unique()))
    reqs, labels, crit = heldout_requests(str(other), ckpt, ckpt_dir, lengths, 100, tiny_lm.tokenizer)
    forced = [{"N": 300, "mode": "forced", "level": 0.5, "speedup": 1.2}, {"N": 300, "mode": "forced", "level": 0.9, "speedup": 2.0}]
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        held = decided_heldout_rows(tiny_lm, handle, ckpt, reqs, labels, crit, forced, _measure_alternating)
    levels = [lv for r in held for lv in r["levels"]]
    ids = [sid for n in lengths for sid, _ in reqs[n]]
    assert len(levels) == len(ids) and any(lv > 0 for lv in levels)     # the net decided sparse somewhere
    for r in held:
        k = [sid for sid, _ in reqs[r["N"]]]
        assert r["unsafe_rate"] == pytest.approx(np.mean([lv > labels[s] + 1e-9 for lv, s in zip(r["levels"], k)]))
        mean = np.mean(r["levels"])   # the bound interpolates the forced speedups over levels (1.0 at level 0)
        assert r["bound"] == pytest.approx(float(np.interp(mean, [0.0, 0.5, 0.9], [1.0, 1.2, 2.0])), abs=1e-3)
