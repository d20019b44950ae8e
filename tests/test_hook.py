"""The inference hook on the tiny model: attach/detach, features equal labeling's, decisions equal
the in-memory controller after export -> load -> attach -> generate, failures fall back to dense,
wrong models are refused; eval.py on RULER files labeled on the fly."""
import json

import numpy as np
import pytest
import torch

import eval as eval_cli
from controller.runtime.checkpoint import load_checkpoint
from controller.guarantee.guard import Guarded
from controller.runtime.hook import attach
from controller.runtime.policy import controller_policy
from data.errors import UserError
from data.features import FEATURE_NAMES
from data.labeling import build_samples
from data.store import LabelStore
from data.tasks import prompt_ids
from data.tiny import tiny_random_llama


def _prompt(job, tokenizer, i):
    sample = build_samples(job.data, tokenizer)[i]
    return sample, torch.tensor([prompt_ids(tokenizer, sample, job.data.chat_template)])


def test_detach_restores_the_model(tiny_lm, tiny_trained):
    job, _, ckpt, _, _ = tiny_trained
    _, ids = _prompt(job, tiny_lm.tokenizer, 0)
    model = tiny_lm.model
    before = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    handle = attach(tiny_lm, ckpt, break_even=None)
    model(input_ids=ids)
    handle.detach()
    assert model.config._attn_implementation == impl
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(input_ids=ids).logits, before)


def test_hook_features_equal_labeling_features(tiny_lm, tiny_trained):
    job, store, ckpt, _, _ = tiny_trained
    table = store.table().query("level == 0").set_index("sample_id")
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        handle.dispatch = False   # every sample probed, also those outside the calibrated lengths
        for i in (0, 4, 9):
            sample, ids = _prompt(job, tiny_lm.tokenizer, i)
            handle.task = sample.task
            tiny_lm.model(input_ids=ids)
            offline = table.loc[sample.sample_id, [f"f_{n}" for n in FEATURE_NAMES]].to_numpy(np.float32)
            np.testing.assert_allclose(handle.last_features[0], offline, rtol=1e-5, atol=1e-6)


def test_export_load_attach_generate_gives_the_in_memory_decisions(tiny_lm, tiny_trained):
    job, store, ckpt, net, calibration = tiny_trained
    levels, seen = np.array(job.labeling.levels), set()
    guard = load_checkpoint(ckpt).guard
    in_memory = Guarded(controller_policy(net, levels, job.calibration.decision), guard, levels)
    with attach(tiny_lm, str(ckpt), break_even=None) as handle:
        handle.dispatch = False   # every sample probed: its features give the expected decision
        for i in range(len(build_samples(job.data, tiny_lm.tokenizer))):
            sample, ids = _prompt(job, tiny_lm.tokenizer, i)
            handle.task = sample.task
            out = tiny_lm.model.generate(ids, max_new_tokens=3, do_sample=False)
            assert out.shape[1] > ids.shape[1]
            (decision,) = handle.last_decisions
            expected = calibration.decide(in_memory.scores(handle.last_features[0][None]))[0]
            flagged = guard.check(handle.last_features[0][None])[0][0]
            assert decision.level == levels[expected] and decision.ood == flagged
            assert (decision.fallback is None) == (not flagged)
            assert decision.achieved_sparsity >= 0 and (decision.level == 0) == (decision.achieved_sparsity == 0)
            seen.add(decision.level)
    assert len(seen) > 1, "the test needs both dense and sparse decisions"


def test_batched_requests_get_their_own_levels(tiny_lm, tiny_trained):
    job, _, ckpt, _, _ = tiny_trained
    tok = tiny_lm.tokenizer
    texts = [tok.decode(_prompt(job, tok, i)[1][0]) for i in (0, 7)]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        tiny_lm.model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert len(handle.last_decisions) == 2
        assert all(d.fallback is None or d.ood for d in handle.last_decisions)   # decided (or guarded), none failed
    with attach(tiny_lm, ckpt, task=["vt", "qa", "cwe"], break_even=None) as handle:   # three names for two rows
        tiny_lm.model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert [d.level for d in handle.last_decisions] == [0.0, 0.0]
        assert all("task list names 3 rows, the batch has 2" in d.fallback for d in handle.last_decisions)
    with attach(tiny_lm, ckpt, task=["vt"], break_even=None) as handle:   # one name for every row
        tiny_lm.model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert all(d.fallback is None or d.ood for d in handle.last_decisions)


def test_a_failing_controller_runs_the_request_dense(tiny_lm, tiny_trained, caplog):
    job, _, ckpt, _, _ = tiny_trained
    _, ids = _prompt(job, tiny_lm.tokenizer, 0)
    dense = tiny_lm.model(input_ids=ids).logits

    class Broken:
        def probabilities(self, features):
            raise RuntimeError("boom")
        scores = scores_from = probabilities

    with attach(tiny_lm, ckpt, break_even=None) as handle:
        handle.policy = Broken()
        logits = tiny_lm.model(input_ids=ids).logits
        tiny_lm.model.generate(ids, max_new_tokens=2, do_sample=False)
        assert handle.last_decisions[0].level == 0.0 and "boom" in handle.last_decisions[0].fallback
    assert torch.allclose(logits, dense, atol=1e-5)
    assert "running it dense" in caplog.text


def test_attach_to_a_different_model_fails_clearly(tiny_trained):
    _, _, ckpt, _, _ = tiny_trained
    with pytest.raises(UserError, match="num_layers"):
        attach(tiny_random_llama(num_layers=2)[0], ckpt, break_even=None)
    other = tiny_random_llama(seed=1)[0]
    with pytest.raises(UserError, match="weights are"):
        attach(other, ckpt, break_even=None)
    assert other.config._attn_implementation != "sparse_prefill"


@pytest.mark.parametrize("task", [123, "poetry", ["vt", "limerick"]])
def test_a_task_the_controller_does_not_know_is_refused(tiny_lm, tiny_trained, task):
    """A misspelt task name would silently count as `unknown`: refused in one line instead."""
    before = tiny_lm.model.config._attn_implementation
    with pytest.raises(UserError, match="is not one of") as e:
        attach(tiny_lm, tiny_trained[2], task=task, break_even=None)
    assert "\n" not in str(e.value) and tiny_lm.model.config._attn_implementation == before
    for fine in (None, "unknown", "vt", ["vt", "qa"]):
        attach(tiny_lm, tiny_trained[2], task=fine, break_even=None).detach()


def test_eval_on_ruler_files_labels_them_and_reports_every_policy(tiny_trained, tmp_path, capsys):
    job, _, ckpt, _, _ = tiny_trained
    ruler = tmp_path / "ruler" / "niah_single"
    ruler.mkdir(parents=True)
    lines = [{"input": f"Remember: the magic number for key-{i} is {1000 + i}. " * 12 + f"What is the magic number for key-{i}?",
              "outputs": [str(1000 + i)], "length": 200} for i in range(6)]
    (ruler / "validation.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "report"
    assert eval_cli.main(["--checkpoint", str(ckpt), "--ruler", str(tmp_path / "ruler"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"controller", "fixed", "length_law", "oracle", "sklearn_logistic", "sklearn_gbm"} <= set(metrics["policies"])
    for m in metrics["policies"].values():
        assert m["n"] == 6 and {"violation_rate", "compute_saved", "mean_level", "accuracy_vs_dense"} <= set(m)
    assert LabelStore(out / "labels").table()["sample_id"].nunique() == 6
    assert all((out / f).is_file() for f in ("report.md", "tradeoff.png", "reliability.png", "label_vs_length.png"))


def test_eval_bad_input_is_one_line_exit_2(tiny_trained, tmp_path, capsys):
    _, store, ckpt, _, _ = tiny_trained
    cases = [(["--checkpoint", str(tmp_path), "--labels", str(store.root)], "not a controller checkpoint"),
             (["--checkpoint", str(ckpt), "--labels", str(tmp_path / "none")], "does not exist"),
             (["--checkpoint", str(ckpt), "--ruler", str(tmp_path / "none")], "does not exist")]
    for args, needle in cases:
        assert eval_cli.main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_threads_inputs_embeds_4d_masks_and_detach_never_raise(tiny_lm, tiny_trained):
    """Concurrent generate calls get their own decisions; calls the hook cannot judge run dense and
    say why; after detach the model is plain."""
    import threading
    job, _, ckpt, _, _ = tiny_trained
    model = tiny_lm.model
    prompts = [_prompt(job, tiny_lm.tokenizer, i)[1] for i in (0, 3)]
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        alone = []
        for ids in prompts:
            model(input_ids=ids)
            alone.append(handle.last_decisions[0].level)
        seen, errors = {}, []

        def worker(i):
            try:
                for _ in range(3):
                    model.generate(prompts[i], max_new_tokens=3, do_sample=False)
                    seen.setdefault(i, []).append(handle.last_decisions[0].level)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and seen == {0: [alone[0]] * 3, 1: [alone[1]] * 3}
        ids = prompts[0]
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            out = model(inputs_embeds=embeds).logits
        d = handle.last_decisions[0]
        assert d.level == 0.0 and "inputs_embeds" in d.fallback
        n = ids.shape[1]
        mask4 = torch.zeros(1, 1, n, n).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        model(input_ids=ids, attention_mask=mask4)
        assert handle.last_decisions[0].level == 0.0 and "4-D attention mask" in handle.last_decisions[0].fallback
    plain = model(inputs_embeds=embeds).logits
    assert torch.allclose(out, plain, atol=1e-5)


def test_memory_stays_flat_over_300_hooked_calls(tiny_lm, tiny_trained):
    """Resident memory and live Python objects after 300 more calls: no per-call leak."""
    import gc
    job, _, ckpt, _, _ = tiny_trained
    ids = _prompt(job, tiny_lm.tokenizer, 1)[1]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    import scipy.stats  # noqa: F401  (first use imports them: not a leak)
    import sklearn.ensemble  # noqa: F401
    with attach(tiny_lm, ckpt, break_even=None) as handle, torch.no_grad():
        for _ in range(120):   # past the monitor's first window test
            tiny_lm.model(input_ids=ids)
        handle.stream.worker.submit(lambda: None).result()
        gc.collect()
        mem, objects = rss(), len(gc.get_objects())
        for _ in range(300):
            tiny_lm.model(input_ids=ids)
        handle.stream.worker.submit(lambda: None).result()
        gc.collect()
        grown_mem, grown_objects = rss() - mem, len(gc.get_objects()) - objects
    assert grown_objects < 2000, f"{grown_objects} more live Python objects after 300 calls"
    assert grown_mem < 24 * 2 ** 20, f"resident memory grew by {grown_mem / 2 ** 20:.1f} MiB over 300 calls"


def test_a_stratified_checkpoint_decides_each_row_in_its_length_stratum(tiny_lm, tiny_trained):
    """Requests up to 100 tokens may take the top level, longer ones are uncertified (dense); the
    hook takes each row's stratum from its token count, given or read from the log_length feature."""
    from controller.guarantee.calibrate import Calibration
    ckpt = load_checkpoint(tiny_trained[2])
    top, dense = Calibration(-1e9, True, 0.05, 0.05, 60, 0.0, 1), Calibration(float("inf"), False, 0.05, 0.05, 0, 0.0, 0)
    ckpt.record["calibration"] = Calibration(float("inf"), True, 0.05, 0.1, 60, 0.0, 1, (100,), (top, dense)).to_json()
    feats = np.zeros((3, len(FEATURE_NAMES)), dtype=np.float32)
    feats[:, FEATURE_NAMES.index("log_length")] = np.log([100, 101, 40])
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        idx, _ = handle.decide(feats)
        assert idx.tolist() == [len(ckpt.levels) - 1, 0, len(ckpt.levels) - 1]
        assert handle.decide(feats, np.array([500, 50, 500]))[0].tolist() == [0, len(ckpt.levels) - 1, 0]


def test_a_checkpoint_whose_probe_layer_runs_sparse_decides_alike_and_skips_more(tiny_lm, tiny_trained):
    """The tiny controller probes layer 0 with layer 0 dense. The same checkpoint with no dense
    layer probes layer 0 before its attention (the same features: nothing runs below it), decides
    there, and runs layer 0 at the decided level too: the same features and level, other logits."""
    import copy
    job, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    sparse_probe = copy.copy(ckpt)
    sparse_probe.record = copy.deepcopy(ckpt.record)
    sparse_probe.record["sparse"]["dense_layers"] = []
    runs = {}
    for name, c in (("dense probe layer", ckpt), ("sparse probe layer", sparse_probe)):
        with attach(tiny_lm, c, break_even=None) as handle:
            handle.dispatch = False
            handle.force_level = 0.7   # the decision's path, at a level that is sure to skip blocks
            sample, ids = _prompt(job, tiny_lm.tokenizer, 3)
            handle.task = sample.task
            with torch.no_grad():
                logits = tiny_lm.model(input_ids=ids).logits
            runs[name] = (handle.last_features[0], handle.last_decisions[0], logits)
    (fa, da, la), (fb, db, lb) = runs["dense probe layer"], runs["sparse probe layer"]
    np.testing.assert_array_equal(fa, fb)
    assert da.level == db.level == 0.7 and da.fallback == db.fallback and da.probability == db.probability
    assert da.achieved_sparsity > 0 and not torch.allclose(la, lb)   # layer 0 ran sparse only in the second


def test_a_checkpoint_that_probes_above_a_sparse_layer_is_refused(tiny_trained, tmp_path):
    import shutil

    from controller.runtime.checkpoint import RECORD_FILE
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_trained[2], bad)
    record = json.loads((bad / RECORD_FILE).read_text())
    record["sparse"].update(dense_layers=[], probe_layers=[0, 1])
    (bad / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(Exception, match=r"read layers \[0\], which are not dense"):
        load_checkpoint(bad)


def test_on_the_cpu_the_hook_runs_every_request_dense_and_says_why(tiny_lm, tiny_trained, caplog):
    """issue 31 item 1: on a CPU the hook made a 6K-token request 2.4-2.7x slower (level 0.95 through
    the reference backend), though no break-even table exists there. By default it now runs dense,
    exactly as unhooked, warns once at attach, and each decision says why."""
    import logging
    ckpt = tiny_trained[2]
    ids = torch.tensor([tiny_lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 30)["input_ids"]])
    with torch.no_grad():
        unhooked = tiny_lm.model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING):
        with attach(tiny_lm, ckpt) as handle, torch.no_grad():
            hooked = tiny_lm.model(input_ids=ids).logits
            (d,) = handle.last_decisions
    assert torch.equal(hooked, unhooked) and d.level == 0.0 and "no break-even table on cpu" in d.fallback
    assert sum("sparse prefill is slower than dense" in r.getMessage() for r in caplog.records) == 1
    with attach(tiny_lm, ckpt, break_even=None) as handle, torch.no_grad():   # decisions on request
        tiny_lm.model(input_ids=ids)
        assert handle.last_decisions[0].fallback is None or "no break-even" not in handle.last_decisions[0].fallback


def test_a_decision_carries_p_safe_per_level_its_threshold_and_a_reason(tiny_lm, tiny_trained):
    """issue 31 item 3: after the warm-up every decision read `level=0.0, probability=1.0` with no
    per-level probabilities, no threshold and no reason; and `attach` had no way to set the warm-up."""
    ckpt = load_checkpoint(tiny_trained[2])
    ids = torch.tensor([tiny_lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 30)["input_ids"]])
    with attach(tiny_lm, ckpt, break_even=None, warmup=2) as handle, torch.no_grad():
        first = []
        for _ in range(3):
            tiny_lm.model(input_ids=ids)
            first.append(handle.last_decisions[0])
    assert all("probation" in d.reason for d in first[:2]) and first[0].p_safe is None
    d = first[2]
    assert d.fallback is None and d.level > 0   # past the warm-up the net decides (this fixture: level 0.9)
    assert len(d.p_safe) == len(ckpt.levels) and all(0 <= p <= 1 for p in d.p_safe)
    assert d.probability == pytest.approx(d.p_safe[list(ckpt.levels).index(d.level)])
    assert d.threshold == ckpt.calibration.threshold_at(ids.shape[1]) and "P(safe) per level" in d.reason
    with pytest.raises(UserError, match="warmup must be"):
        attach(tiny_lm, ckpt, break_even=None, warmup=-1)


def test_a_decisions_reason_reads_as_a_sentence_for_each_outcome():
    from controller.runtime.decision import Decision
    p = (1.0, 0.6, 0.2)
    assert Decision(0.5, 0.6, 0.4, p_safe=p, threshold=0.55).reason.startswith(
        "level 0.5: the most aggressive level that passes the calibrated rule (score threshold 0.55; P(safe) per level: 1.00, 0.60, 0.20)")
    assert Decision(0.0, 1.0, 0.0, p_safe=p, threshold=1.54).reason.startswith("dense: no sparse level passes the calibrated rule")
    assert Decision(0.0, 1.0, 0.0, p_safe=p).reason.startswith("dense: no threshold passed calibration for this length")
    assert Decision(0.0, 1.0, 0.0, fallback="probation: request 1").reason == "probation: request 1"
