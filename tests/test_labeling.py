"""Labeling on the tiny model: row layout, accounting, features, resume, store identity, criterion."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from controller.learning.config import ControllerJobConfig
from data.config import LabelJobConfig, load_config
from data.errors import UserError
from data.features import FEATURE_NAMES
from data.labeling import Labeler
from data.runner import run_labeling
from data.store import LabelStore, apply_criterion, load_labels, sample_labels


def tiny_job(out, **data):
    overrides = [f"labeling.out={out}"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config(ControllerJobConfig, "configs/test_tiny.yaml", overrides).label_job()


def test_labels_every_sample_at_every_level(tiny_lm, tmp_path):
    job = tiny_job(tmp_path / "store")
    df = run_labeling(job, tiny_lm).table()
    levels = list(job.labeling.levels)
    assert len(df) == 4 * len(levels)
    assert (df.groupby("sample_id")["level"].apply(list) == pd.Series({k: levels for k in df.sample_id.unique()})).all()
    assert not df.duplicated(["sample_id", "level"]).any()
    # achieved sparsity: 0 at level 0, non-decreasing in the level, never above nominal
    for _, g in df.groupby("sample_id"):
        s = g.sort_values("level")["achieved_sparsity"].to_numpy()
        assert s[0] == 0 and (np.diff(s) >= 0).all() and (s <= g.sort_values("level")["level"].to_numpy() + 1e-9).all()
    assert (df["kept_blocks_all"] <= df["causal_blocks_all"]).all()
    feats = df[[f"f_{n}" for n in FEATURE_NAMES]].to_numpy()
    assert np.isfinite(feats).all()
    assert np.isfinite(df[["nll_gold", "score"]].to_numpy()).all()


def test_resume_after_a_crash_loses_and_duplicates_nothing(tiny_lm, tmp_path, monkeypatch):
    reference = run_labeling(tiny_job(tmp_path / "clean"), tiny_lm).table()
    original = Labeler.label_samples
    calls = {"n": 0}

    def crash_on_third(self, samples):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return original(self, samples)

    monkeypatch.setattr(Labeler, "label_samples", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_labeling(tiny_job(tmp_path / "crashy"), tiny_lm)
    store = LabelStore(tmp_path / "crashy")
    assert len(store.shards()) == 1 and len(store.done_ids()) == 2  # shard_size 2: first shard landed
    monkeypatch.setattr(Labeler, "label_samples", original)
    resumed = run_labeling(tiny_job(tmp_path / "crashy"), tiny_lm).table()
    assert len(store.shards()) == 2
    key = ["sample_id", "level"]
    assert not resumed.duplicated(key).any()
    cols = ["sample_id", "level", "achieved_sparsity", "score", "nll_gold", "nll_dense_answer", "answer"]
    pd.testing.assert_frame_equal(resumed[cols], reference[cols])


def test_decoding_samples_together_gives_the_labels_of_one_at_a_time(tiny_lm, tmp_path):
    """Stacked decode pads prompts of different lengths on the left; the labels must not move."""
    one = run_labeling(tiny_job(tmp_path / "one"), tiny_lm).table()
    job = tiny_job(tmp_path / "three")
    job = dataclasses.replace(job, labeling=dataclasses.replace(job.labeling, batch_samples=3))
    three = run_labeling(job, tiny_lm).table()
    assert three["n_tokens"].nunique() > 1  # the batches really mixed prompt lengths
    key = ["sample_id", "level"]
    pd.testing.assert_frame_equal(three[key + ["achieved_sparsity", "answer", "score", "answer_tokens"]],
                                  one[key + ["achieved_sparsity", "answer", "score", "answer_tokens"]])
    for col in ["nll_gold", "nll_dense_answer"]:
        np.testing.assert_allclose(three[col], one[col], rtol=1e-4, atol=1e-5)
    feats = [f"f_{n}" for n in FEATURE_NAMES]
    np.testing.assert_allclose(three[feats].to_numpy(), one[feats].to_numpy(), rtol=1e-5, atol=1e-6)


def test_more_samples_extend_a_store_other_settings_are_refused(tiny_lm, tmp_path):
    out = tmp_path / "store"
    run_labeling(tiny_job(out, samples_per_length=1), tiny_lm)
    assert len(LabelStore(out).done_ids()) == 2
    run_labeling(tiny_job(out, samples_per_length=2), tiny_lm)
    assert len(LabelStore(out).done_ids()) == 4
    with pytest.raises(UserError, match="other settings.*data.seed"):
        run_labeling(tiny_job(out, seed=5), tiny_lm)


def _rows(sample, levels, scores, nlls):
    return [{"sample_id": sample, "task": "vt", "target_length": 512, "n_tokens": 500, "level": lv, "score": s,
             "nll_gold": n, "nll_dense_answer": n} for lv, s, n in zip(levels, scores, nlls)]


def test_criterion_and_monotone_closure():
    levels = [0.0, 0.5, 0.7, 0.9]
    df = pd.DataFrame(_rows("a", levels, [1, 1, 1, 1], [1.0, 1.05, 1.3, 1.02])  # 0.7 unsafe by NLL
                      + _rows("b", levels, [1, 1, 0, 1], [1.0, 1.0, 1.0, 1.0])    # 0.7 unsafe by score
                      + _rows("c", levels, [0, 0, 0, 0], [2.0, 2.0, 2.05, 2.09]))  # all safe
    crit = {"tau": 0.1, "nll_reference": "gold", "require_score": True}
    labels = sample_labels(apply_criterion(df, crit)).set_index("sample_id")["label"]
    assert labels.to_dict() == {"a": 0.5, "b": 0.5, "c": 0.9}
    loose = dict(crit, tau=0.5)
    assert sample_labels(apply_criterion(df, loose)).set_index("sample_id")["label"]["a"] == 0.9
    no_score = dict(crit, require_score=False)
    assert sample_labels(apply_criterion(df, no_score)).set_index("sample_id")["label"]["b"] == 0.9


def test_store_meta_describes_itself(tiny_lm, tmp_path):
    store = run_labeling(tiny_job(tmp_path / "s"), tiny_lm)
    df, meta = load_labels(store.root)
    ident = meta["identity"]
    assert ident["model"] == tiny_lm.fingerprint and ident["levels"] == [0.0, 0.5, 0.9]
    assert ident["feature_names"] == list(FEATURE_NAMES) and meta["criterion"]["tau"] == 0.1
    assert {"torch", "transformers"} <= set(meta["versions"]) and "safe" in df
    assert dataclasses.is_dataclass(LabelJobConfig)


def test_two_gloo_ranks_write_exactly_the_rows_of_one_process(tiny_lm, tmp_path):
    """DDP on CPU (gloo): disjoint per-rank shares, per-rank shards, merged without loss or duplicates."""
    one = run_labeling(tiny_job(tmp_path / "one"), tiny_lm).table()
    job = load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                      [f"labeling.out={tmp_path / 'two'}", "labeling.devices=2", "labeling.strategy=ddp_spawn"]).label_job()
    run_labeling(job, tiny_lm)
    store = LabelStore(tmp_path / "two")
    names = sorted(p.name for p in store.shards())
    assert any(n.startswith("part-r000-") for n in names) and any(n.startswith("part-r001-") for n in names)
    two = store.table()
    cols = ["sample_id", "level", "achieved_sparsity", "score", "nll_gold", "answer"]
    pd.testing.assert_frame_equal(two[cols], one[cols], check_exact=False, rtol=1e-5)
    run = store.runs()[-1]
    assert run["world_size"] == 2 and run["sample_levels"] == len(two)


def test_planned_ids_match_generated_samples_and_workers_change_nothing(tiny_lm, tmp_path):
    from data.labeling import plan_samples, realize
    job = tiny_job(tmp_path / "a")
    plan = plan_samples(job.data)
    assert [p.sample_id for p in plan] == [realize(p, tiny_lm.tokenizer).sample_id for p in plan]
    base = run_labeling(job, tiny_lm).table()
    workers = load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                          [f"labeling.out={tmp_path / 'b'}", "labeling.loader_workers=1"]).label_job()
    pd.testing.assert_frame_equal(run_labeling(workers, tiny_lm).table()[["sample_id", "level", "nll_gold", "answer"]],
                                  base[["sample_id", "level", "nll_gold", "answer"]])


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tiny_lm, tmp_path):
    import json
    import socket
    import subprocess
    import sys
    from data.store import LOCK_FILE
    job = tiny_job(tmp_path / "store")
    lock = tmp_path / "store" / LOCK_FILE
    lock.parent.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(UserError, match=f"being written by pid {alive.pid}") as e:
            run_labeling(job, tiny_lm)
        assert "\n" not in str(e.value) and not (tmp_path / "store" / "shards").exists()
    finally:
        alive.kill()
        alive.wait()
    lock.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "then"}))   # now dead
    df = run_labeling(job, tiny_lm).table()
    assert len(df) == 4 * len(job.labeling.levels) and not lock.exists()
    lock.write_text("{half a lock")   # a crash while writing the lock: taken over
    assert len(run_labeling(job, tiny_lm).table()) == len(df) and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "x"}))   # cannot tell: refuse
    with pytest.raises(UserError, match="another-host"):
        run_labeling(job, tiny_lm)


def test_a_sample_the_tokenizer_cannot_make_is_skipped_not_fatal(tiny_lm, tmp_path, monkeypatch, caplog):
    """A planned sample that cannot be made at its target length with this tokenizer (a task's
    smallest instance is longer) is skipped with a warning; the others are labeled, and a rerun
    tries the skipped one again."""
    from data.labeling import PlannedSample
    job = tiny_job(tmp_path / "store")
    original = PlannedSample.realize
    victim = None

    def realize(self, tokenizer):
        nonlocal victim
        victim = victim or self.sample_id
        if self.sample_id == victim:
            raise UserError("target length 96 is too short for this task (minimum ~120 tokens)")
        return original(self, tokenizer)
    monkeypatch.setattr(PlannedSample, "realize", realize)
    with caplog.at_level("WARNING"):
        df = run_labeling(job, tiny_lm).table()
    assert df.sample_id.nunique() == 3 and victim not in set(df.sample_id)
    assert any(victim in r.getMessage() and "too short" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(PlannedSample, "realize", original)
    assert victim in set(run_labeling(job, tiny_lm).table().sample_id)


def test_a_sliding_window_model_labels_the_same_decoded_together_or_alone(tmp_path, tiny_gemma3):
    """Gemma-style caches keep only their window: prompts at least that long decode stacked, shorter
    ones alone; the labels equal labeling one sample at a time."""
    lm = tiny_gemma3(window=256)
    job = tiny_job(tmp_path / "one", lengths="[200, 300]")
    one = run_labeling(job, lm).table()
    job = tiny_job(tmp_path / "four", lengths="[200, 300]")
    job = dataclasses.replace(job, labeling=dataclasses.replace(job.labeling, batch_samples=4))
    four = run_labeling(job, lm).table()
    assert (four["n_tokens"] < 255).any() and (four["n_tokens"] >= 255).any()   # both groups were exercised
    key = ["sample_id", "level"]
    cols = ["achieved_sparsity", "answer", "score", "answer_tokens"]
    pd.testing.assert_frame_equal(four.sort_values(key)[key + cols].reset_index(drop=True),
                                  one.sort_values(key)[key + cols].reset_index(drop=True))
    np.testing.assert_allclose(four.sort_values(key)[["nll_gold", "nll_dense_answer"]],
                               one.sort_values(key)[["nll_gold", "nll_dense_answer"]], rtol=1e-4, atol=1e-5)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny_lm, tmp_path, capsys):
    """issue 30 item 4: labeling 60-80 prompts on a CPU showed nothing for 30 minutes when its output
    was not a terminal. Now: a line after the first batch (how long the job will take here), and at
    the end, each with done / total, rate and time left."""
    job = dataclasses.replace(tiny_job(tmp_path / "store"), labeling=dataclasses.replace(
        tiny_job(tmp_path / "store").labeling, progress=True))
    run_labeling(job, tiny_lm)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("labeling: ")]
    assert lines[0].startswith("labeling: 1/4 batches (1 requests)") and lines[-1].startswith("labeling: 4/4 batches (4 requests)")
    assert all("requests/s" in x and "min left on this machine" in x for x in lines)


def test_a_dense_model_that_fails_everything_is_warned_about(tiny_trained, tmp_path):
    """issue 31 item 7: a model that scored 0 dense on every task had every level labeled safe under
    gold, without a word. The summary now says so (and not under a label-free criterion)."""
    from data.report import dense_fails_warning, summary_markdown
    store = tiny_trained[1]
    table = store.table()
    assert table.loc[table["level"] == 0.0, "score"].max() == 0   # the tiny random model answers nothing
    assert "warning: the dense model scores 0" in summary_markdown(store, {"name": "gold"})
    assert dense_fails_warning(table, {"name": "divergence"}) is None
    solved = table.copy()
    solved.loc[solved.index[solved["level"] == 0.0][:1], "score"] = 1.0
    assert dense_fails_warning(solved, {"name": "gold"}) is None
