"""Labels that measure the model: the raw teacher-forced measurements, the dense-vs-dense noise
floor and the `divergence` criterion built from them."""
import numpy as np
import pytest
import torch

from controller.runtime.hook import attach
from data.config import CriterionConfig
from data.criteria import apply_criterion, null_threshold
from data.errors import UserError
from data.labeling import DIVERGENCE_COLUMNS, Labeler, build_samples, divergence_from
from data.runner import run_labeling
from data.store import LabelStore
from data.tasks import prompt_ids

DIVERGENCE = {"name": "divergence", "measure": "kl_mean", "null_quantile": 0.99}


def _job(tmp_path, name, extra=()):
    from controller.learning.config import ControllerJobConfig
    from data.config import load_config
    return load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                       [f"labeling.out={tmp_path / name}", "data.samples_per_length=12", *extra]).label_job()


def test_measurements_of_a_row_against_itself_are_null_and_grow_with_damage(gen):
    logp = torch.randn(3, 5, 11, generator=gen).log_softmax(-1)
    logp[1] = logp[0]                                     # row 1: the reference itself
    valid = torch.tensor([[True] * 5, [True] * 5, [True] * 3 + [False] * 2])
    answers = [logp[0].argmax(-1)[:4].tolist()] * 3
    m = divergence_from(logp, valid, answers, [0, 0, 0])
    assert m["kl_mean"][1] == 0 and m["kl_max"][1] == 0 and m["gap_max"][1] == 0
    assert m["top1_agree"][1] == 1 and m["agree_prefix"][1] == 5 and m["answer_positions"].tolist() == [5, 5, 3]
    assert m["kl_mean"][2] > 0 and m["kl_max"][2] >= m["kl_mean"][2]
    assert torch.allclose(m["nll"][0], -logp[0, torch.arange(4), answers[0]].mean())


def test_the_null_is_judged_safe_and_a_damaged_sparse_row_unsafe(tiny_lm, tmp_path, monkeypatch):
    """Dense-vs-dense pairs (the noise floor, here from the labeler's own null mode) pass the
    divergence criterion at its own threshold; sparse rows whose cached values were damaged fail."""
    store = run_labeling(_job(tmp_path, "clean", ["labeling.null_share=1.0", "labeling.batch_samples=3"]), tiny_lm)
    clean = store.table()
    assert clean.filter(like="null_").notna().all().all() and (clean["null_same_answer"] == 1).all()
    t = null_threshold(clean, "kl_mean", 0.99)
    null = clean.groupby("sample_id")["null_kl_mean"].first()
    assert (null <= t).mean() >= 0.99
    real = Labeler.prefill

    def damaged(self, sample):
        p = real(self, sample)
        for layer in p.cache.layers:
            layer.values[1:] = -layer.values[1:]     # every sparse row's cached values negated
        return p
    monkeypatch.setattr(Labeler, "prefill", damaged)
    broken = run_labeling(_job(tmp_path, "damaged", ["labeling.null_share=1.0", "labeling.batch_samples=3"]), tiny_lm).table()
    judged = apply_criterion(broken, DIVERGENCE)
    assert judged.loc[judged["level"] > 0, "safe"].eq(False).all() and judged.loc[judged["level"] == 0, "safe"].all()
    assert (broken.loc[broken["level"] > 0, "kl_mean"] > 100 * max(t, 1e-6)).all()


def test_divergence_needs_a_noise_floor_or_a_threshold(tiny_trained):
    table = tiny_trained[1].table()
    no_null = table.drop(columns=[c for c in table.columns if c.startswith("null_")])
    with pytest.raises(UserError, match="noise floor"):
        apply_criterion(no_null, DIVERGENCE)
    fixed = apply_criterion(no_null, {**DIVERGENCE, "threshold": 1e9})
    assert fixed["safe"].all()
    with pytest.raises(UserError, match="criterion.measure"):
        CriterionConfig(name="divergence", measure="vibes")


def test_raw_measurements_offline_equal_the_hook_path(tiny_lm, tiny_trained):
    """A row's measurements as the labeler stored them equal those from the inference hook at the
    same level forced: sparse prefill through the hook, the dense answer teacher forced after it,
    against the unhooked model."""
    job, store, ckpt, _, _ = tiny_trained
    table = store.table().set_index(["sample_id", "level"])
    model = tiny_lm.model
    for i in (0, 7):
        sample = build_samples(job.data, tiny_lm.tokenizer)[i]
        ids = torch.tensor([prompt_ids(tiny_lm.tokenizer, sample, job.data.chat_template)])
        dense = model.generate(ids, max_new_tokens=sample.max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        dense = dense[:next((k for k, t in enumerate(dense) if t == tiny_lm.tokenizer.eos_token_id), len(dense))]
        answer = torch.tensor([dense])

        def teacher_forced():
            out = model(input_ids=ids, use_cache=True)
            more = model(input_ids=answer, past_key_values=out.past_key_values).logits
            return torch.cat([out.logits[:, -1:], more], dim=1).float().log_softmax(-1)[0]
        reference = teacher_forced()
        with attach(tiny_lm, ckpt, break_even=None) as handle:
            handle.force_level = 0.9
            hooked = teacher_forced()
        valid = torch.ones(2, len(dense) + 1, dtype=torch.bool)
        m = divergence_from(torch.stack([reference, hooked]), valid, [dense, dense], [0, 0])
        row = table.loc[(sample.sample_id, 0.9)]
        assert row["answer_tokens"] == len(dense)
        for k in DIVERGENCE_COLUMNS:
            np.testing.assert_allclose(float(m[k][1]), row[k], rtol=1e-3, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(float(m["nll"][1]), row["nll_dense_answer"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(m["nll"][0]), table.loc[(sample.sample_id, 0.0), "nll_dense_answer"], rtol=1e-4)


def test_the_floor_without_the_alone_decode_measures_the_same(tiny_lm, tmp_path):
    """`labeling.null_answers: false` (calibrate.py's setting) skips the alone greedy decode: the
    teacher-forced floor is the same, only the fidelity/gold nulls are left out (NaN)."""
    import pandas as pd
    base = ["labeling.null_share=1.0", "data.samples_per_length=2"]
    full = run_labeling(_job(tmp_path, "full", base), tiny_lm).table()
    lean = run_labeling(_job(tmp_path, "lean", [*base, "labeling.null_answers=false"]), tiny_lm).table()
    cols = [f"null_{k}" for k in DIVERGENCE_COLUMNS] + ["null_nll_rise"]
    pd.testing.assert_frame_equal(lean[cols], full[cols])
    assert lean["null_same_answer"].isna().all() and lean["null_score"].isna().all()
    assert full["null_same_answer"].notna().all()


def test_calibrate_default_is_the_criterion_the_validation_table_picked():
    """docs/results/criteria.json names the default; the code's default (calibrate.py, and a config
    that says `name: divergence` and nothing else) is that criterion."""
    import json
    from pathlib import Path
    from data.criteria import LABEL_FREE_DEFAULT, criterion_dict
    doc = json.loads((Path(__file__).resolve().parents[1] / "docs/results/criteria.json").read_text())
    name, rest = doc["default"].split(":")
    measure, quantile = rest.split("@")
    assert (name, measure, float(quantile)) == (LABEL_FREE_DEFAULT["name"], LABEL_FREE_DEFAULT["measure"],
                                                LABEL_FREE_DEFAULT["null_quantile"])
    plain = criterion_dict(CriterionConfig(name="divergence"))
    assert (plain["measure"], plain["null_quantile"]) == (measure, float(quantile))
    models = {r["model"] for r in doc["rows"]}
    assert {"smollm2-135m", "gemma3-270m"} <= models


def test_dense_answers_only_measure_the_same_and_refuse_answer_criteria(tiny_lm, tmp_path):
    """`labeling.sparse_answers: false` decodes the dense row only: every teacher-forced measurement
    and the dense answer are those of the full decode, sparse rows carry no answer, and the criteria
    that judge answers refuse the store in one line while divergence judges it."""
    common = ["labeling.null_share=1.0", "labeling.batch_samples=3"]
    full = run_labeling(_job(tmp_path, "full", common), tiny_lm).table().set_index(["sample_id", "level"])
    lean = run_labeling(_job(tmp_path, "lean", [*common, "labeling.sparse_answers=false"]), tiny_lm).table()
    lean_i = lean.set_index(["sample_id", "level"]).loc[full.index]
    for col in (*DIVERGENCE_COLUMNS, "nll_dense_answer", "nll_gold", "null_kl_mean"):
        np.testing.assert_allclose(lean_i[col].to_numpy(float), full[col].to_numpy(float), rtol=1e-4, atol=1e-6)
    dense = lean_i.xs(0.0, level="level")
    assert (dense["answer"] == full.xs(0.0, level="level")["answer"]).all() and dense["answer"].notna().all()
    sparse = lean[lean["level"] > 0]
    assert sparse["answer"].isna().all() and sparse["score"].isna().all() and (sparse["answer_tokens"] == -1).all()
    for name in ("gold", "fidelity"):
        with pytest.raises(UserError, match="sparse_answers: false") as e:
            apply_criterion(lean, {"name": name})
        assert "\n" not in str(e.value)
    judged = apply_criterion(lean, DIVERGENCE)
    assert judged.loc[judged["level"] == 0, "safe"].all()
