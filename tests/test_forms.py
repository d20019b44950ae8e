"""Surface forms: every generator in every haystack kind, phrasing and template setting is
deterministic and sized; classic samples are those of store v1; adopting a classic store into a
varied one; holding out a form."""
import itertools
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from controller.learning.config import ControllerJobConfig
from controller.experiments.holdout import GROUPINGS, in_group
from data.adopt import adopt_store
from data.adopt import main as adopt_main
from data.config import load_config
from data.runner import run_labeling
from data.store import LabelStore
from data.tasks import TASK_TYPES, TASKS, TaskSpec, build_task, generate_sample, prompt_ids, prompt_text
from data.tasks import base
from data.tasks.forms import FILLERS, PHRASINGS, Form, draw_form, form_part

FORMS = [Form(f, p, c) for f, p, c in itertools.product(FILLERS, range(PHRASINGS), (True, False))]


def forced(monkeypatch, form):
    monkeypatch.setattr(base, "form_of", lambda form_set, key: form)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("form", FORMS[::5] + FORMS[1::7], ids=lambda f: f.name())
def test_every_form_is_deterministic_sized_and_answerable(tokenizer, monkeypatch, name, form):
    forced(monkeypatch, form)
    for length in (512, 4096):
        a = generate_sample(name, build_task(TaskSpec(name)), tokenizer, length, 3, seed=5, form_set="varied")
        b = generate_sample(name, build_task(TaskSpec(name)), tokenizer, length, 3, seed=5, form_set="varied")
        c = generate_sample(name, build_task(TaskSpec(name)), tokenizer, length, 3, seed=6, form_set="varied")
        assert a == b and a.input != c.input
        n = len(prompt_ids(tokenizer, a))
        assert abs(n - length) <= 0.05 * length, f"{name} {form.name()}: {n} tokens for {length}"
        kind = getattr(build_task(TaskSpec(name)), "haystack", form.filler)   # natural text names its own kind
        assert a.form == replace(form, filler=kind).name() and a.sample_id.endswith("-varied")
        assert ("<|im_start|>" in prompt_text(tokenizer, a)) == form.chat
        # fwe's answer is a count, nat_summary's the docstring it leaves out; a conversation's documents
        # are in its earlier turns
        if name != "fwe" and getattr(build_task(TaskSpec(name)), "answer_in_prompt", True):
            assert all(o in a.input + "".join(c for _, c in a.history) for o in a.outputs)


def test_varied_forms_cover_every_dimension_and_are_drawn_from_the_key():
    forms = [draw_form(f"0|niah_single|512|{i}") for i in range(400)]
    assert forms == [draw_form(f"0|niah_single|512|{i}") for i in range(400)]
    assert {f.filler for f in forms} == set(FILLERS) and {f.phrasing for f in forms} == set(range(PHRASINGS))
    assert {f.chat for f in forms} == {True, False}
    assert [form_part("code/p2/plain", d) for d in ("filler", "phrasing", "chat")] == ["code", "p2", "plain"]
    assert form_part("", "filler") == ""


def test_classic_samples_are_the_samples_of_store_v1(tokenizer):
    """Store v2 adopts v1's rows because classic generation did not change: prompt lengths agree."""
    rows = LabelStore("data/labels/smollm2-135m/v1").table()
    dense = rows[rows["level"] == 0].set_index("sample_id")
    for name in TASK_TYPES:   # v1's tasks
        s = generate_sample(name, build_task(TaskSpec(name)), tokenizer, 1024, 7, seed=0)
        assert s.form == "prose/p0/chat"
        assert len(prompt_ids(tokenizer, s)) == dense.loc[s.sample_id, "n_tokens"], name


def _job(tmp_path, out, forms):
    return load_config(ControllerJobConfig, "configs/test_tiny.yaml",
                       [f"labeling.out={out}", f"data.forms={forms}"]).label_job()


def test_adopting_a_classic_store_labels_only_what_it_lacks(tiny_lm, tmp_path):
    classic = run_labeling(_job(tmp_path, tmp_path / "v1", "[classic]"), tiny_lm)
    job = _job(tmp_path, tmp_path / "v2", "[classic, varied]")
    store = adopt_store(classic.root, job)
    assert store.done_ids() == classic.done_ids()
    run_labeling(job, tiny_lm)
    table = store.table()
    dense = table[table["level"] == 0]
    assert len(dense) == 2 * len(classic.done_ids()) and not table.duplicated(["sample_id", "level"]).any()
    old = classic.table().set_index(["sample_id", "level"])
    kept = table.set_index(["sample_id", "level"]).loc[old.index]
    pd.testing.assert_series_equal(kept["nll_gold"], old["nll_gold"])
    assert set(dense["form"].str.split("/").str[0]) >= {"prose"} and dense["form"].ne("").all()
    assert store.meta()["adopted"][0]["rows"] == len(old)


def test_adopt_refuses_with_one_line_and_writes_nothing(tiny_lm, tmp_path, capsys):
    classic = run_labeling(_job(tmp_path, tmp_path / "v1", "[classic]"), tiny_lm)
    cases = [("labeling.out", tmp_path / "v1", "exists"),                     # target exists
             ("data.forms", "[varied]", "classic form set"),                   # no classic form in the target
             ("data.seed", "3", "seed")]                                       # other samples
    for key, value, words in cases:
        out = tmp_path / f"new_{key}"
        overrides = [f"labeling.out={out}", "data.forms=[classic,varied]", f"{key}={value}"]
        rc = adopt_main(["--source", str(classic.root), "--config", "configs/test_tiny.yaml", *overrides])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and words in err, err
        assert not out.exists() or key == "labeling.out"


def test_held_out_groups_follow_the_family_or_the_form():
    from types import SimpleNamespace
    arrays = SimpleNamespace(tasks=np.array(["niah_single", "vt", "cwe", "niah_multikey"]),
                             forms=np.array(["prose/p0/chat", "code/p1/plain", "", "json/p2/plain"]))
    assert in_group(arrays, "family", "niah").tolist() == [True, False, False, True]
    assert in_group(arrays, "filler", "code").tolist() == [False, True, False, False]
    assert in_group(arrays, "chat", "plain").tolist() == [False, True, False, True]
    assert set(GROUPINGS["filler"]) == set(FILLERS)
