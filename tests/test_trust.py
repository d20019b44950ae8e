"""A guarantee on the user's own traffic: the label-free fidelity criterion, prompts without
answers, calibrate.py (label -> Learn-then-Test -> checkpoint), the shift guard (conformal p-values,
length range, in the hook) and the two-sample test. Seeded; a failing draw can be replayed."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import calibrate as calibrate_cli
import eval as eval_cli
from controller.guarantee.calibrate import calibrate, ltt_p_values, violations
from controller.learning.dataset import arrays_from_frame, arrays_from_store
from controller.runtime.checkpoint import load_checkpoint
from controller.guarantee.guard import ShiftGuard, two_sample_test
from controller.runtime.hook import attach
from controller.runtime.policy import Policy
from controller.guarantee.recalibrate import min_requests
from data.errors import UserError
from data.features import FEATURE_NAMES
from data.criteria import LABEL_FREE_DEFAULT, null_threshold
from data.store import LabelStore, apply_criterion
from data.tasks import TaskSpec, build_task, generate_sample, read_prompts
from data.tasks.scoring import normalise_answer

FIDELITY = {"name": "fidelity", "tau": 0.1}


def rows(sample, task, answers, nlls, score=np.nan):
    return [{"sample_id": sample, "task": task, "level": lv, "answer": a, "nll_dense_answer": n, "nll_gold": np.nan,
             "score": score, "outputs": []} for lv, a, n in zip((0.0, 0.5, 0.9), answers, nlls)]


def test_fidelity_criterion_on_hand_made_rows():
    df = pd.DataFrame(
        rows("a", "niah_single", ["\n\n* 3862861\n* 3862861\n", "- 3862861", "* 3862861\n* 4711709"], [1.0, 1.05, 1.0])
        + rows("b", "unknown", ["Hello world.", "  Hello world.\n", "hello world."], [0.5, 0.5, 0.5])
        + rows("c", "qa", [" 1718.", "1718", " 1718."], [2.0, 2.05, 2.2])
        + rows("d", "unknown", ["", "", "x"], [np.nan, np.nan, np.nan]))
    safe = apply_criterion(df, FIDELITY).set_index(["sample_id", "level"])["safe"]
    assert safe.to_dict() == {("a", 0.0): True, ("a", 0.5): True, ("a", 0.9): False,   # another needle
                              ("b", 0.0): True, ("b", 0.5): True, ("b", 0.9): False,   # unknown: exact text
                              ("c", 0.0): True, ("c", 0.5): True, ("c", 0.9): False,   # NLL rise 0.2 > tau
                              ("d", 0.0): True, ("d", 0.5): True, ("d", 0.9): False}
    # the gold criterion cannot judge rows without reference scores: every sparse row is unsafe
    gold = apply_criterion(df, {"tau": 0.1, "nll_reference": "gold", "require_score": True})
    assert not gold.loc[gold["level"] > 0, "safe"].any()


def test_task_normalisation():
    assert normalise_answer("cwe", "1. apple\n2. Pear, apple") == normalise_answer("cwe", "- pear - apple")
    assert normalise_answer("vt", "X1 X2") != normalise_answer("vt", "X1")
    assert normalise_answer("niah_single", "1. 3862861.\n2) 12") == {"3862861", "12"}
    assert normalise_answer("qa", "In 1718.") == normalise_answer("qa", "in 1718") != normalise_answer("qa", "1718 in")
    assert normalise_answer("unknown", " a b ") == "a b" != normalise_answer("unknown", "a  b")
    assert normalise_answer("summarise", "A") != normalise_answer("summarise", "a")


def test_prompt_formats_and_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"input": "hi", "task": "qa", "answer_prefix": "A:"}\n\n{"input": "yo", "task": "mine"}\n'
                 '{"input": "x", "outputs": ["y"], "length": 9}\n')
    s = read_prompts(f)
    assert [x.sample_id for x in s] == ["prompts:p.jsonl:1", "prompts:p.jsonl:3", "prompts:p.jsonl:4"]
    assert [x.task for x in s] == ["qa", "unknown", "unknown"] and s[0].answer_prefix == "A:"
    assert s[0].outputs == () and s[2].outputs == ("y",) and s[2].target_length == 9
    txt = tmp_path / "txt" / "sub"
    txt.mkdir(parents=True)
    (txt / "one.txt").write_text("first prompt")
    (txt.parent / "two.txt").write_text("second prompt")
    assert sorted(x.input for x in read_prompts(tmp_path / "txt")) == ["first prompt", "second prompt"]
    bad = [('{"outputs": ["a"]}', "missing field"), ('{"input": 3}', "non-empty string"), ("[1]", "JSON object"),
           ('{"input": "x", "outputs": "a"}', "list of strings"), ("{", "not valid JSON"),
           ("[" * 100000 + "]" * 100000, "nested too deeply"), ('{"input": "x", "task": 1}', "`task` must be")]
    for i, (line, msg) in enumerate(bad):
        g = tmp_path / f"bad{i}.jsonl"
        g.write_text('{"input": "ok"}\n' + line + "\n")
        with pytest.raises(UserError, match=msg) as e:
            read_prompts(g)
        assert f"bad{i}.jsonl:2" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "latin.jsonl").write_bytes('{"input": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.jsonl")


def test_min_requests_is_the_smallest_certifiable_count():
    for alpha, delta in ((0.05, 0.1), (0.1, 0.2), (0.02, 0.05)):
        n = min_requests(alpha, delta)
        assert ltt_p_values(np.array([0.0]), n, alpha)[0] <= delta < ltt_p_values(np.array([0.0]), n - 1, alpha)[0]


def test_guard_p_values_are_conformal_and_flag_far_requests():
    rng = np.random.default_rng(0)
    F = len(FEATURE_NAMES)
    ref = rng.normal(size=(400, F))
    ref[:, 0] = rng.uniform(np.log(1000), np.log(8000), 400)
    guard = ShiftGuard.fit(ref, np.exp(ref[:, 0]).round(), np.zeros(F), np.ones(F), p_min=0.1)
    same = rng.normal(size=(3000, F))
    same[:, 0] = rng.uniform(np.log(1100), np.log(7900), 3000)
    flagged = guard.check(same)[0]
    assert 0.06 < flagged.mean() < 0.14          # exchangeable requests are flagged at about p_min
    far = same.copy()
    far[:, 1:4] += 6.0
    assert guard.check(far)[0].mean() > 0.99
    longer = same[:5].copy()
    longer[:, 0] = np.log(9000)
    f, _, reasons = guard.check(longer)
    assert f.all() and all("outside the calibrated range" in r for r in reasons)
    back = ShiftGuard.from_json(json.loads(json.dumps(guard.to_json())), F, np.array([0.0, 0.5]))
    np.testing.assert_allclose(back.p_values(same[:50]), guard.p_values(same[:50]), atol=1e-3)
    with pytest.raises(ValueError):
        ShiftGuard.from_json({**guard.to_json(), "fallback": 0.3}, F, np.array([0.0, 0.5]))


def test_two_sample_test_flags_shift_and_not_exchangeable_sets():
    rng = np.random.default_rng(1)
    reject_same = reject_shift = 0
    draws = 30
    for _ in range(draws):
        a = rng.normal(size=(200, 8))
        reject_same += two_sample_test(a, rng.normal(size=(200, 8)), seed=int(rng.integers(1 << 30)))["p_value"] < 0.05
        b = rng.normal(size=(200, 8))
        b[:, :3] += 0.6
        reject_shift += two_sample_test(a, b, seed=int(rng.integers(1 << 30)))["p_value"] < 0.05
    assert reject_same / draws <= 0.15 and reject_shift / draws >= 0.9


class LatentPolicy(Policy):
    """P(safe at level k) from the request's noisy latent difficulty (feature 1): a policy whose risk
    rises as its threshold falls."""
    name = "latent"
    lambdas = np.round(np.linspace(1, 0, 101), 3)
    CUT = np.array([0.5, 0.0, -0.5])

    def scores(self, features):
        p = 1 / (1 + np.exp(-(self.CUT[None] - features[:, 1:2]) * 2))
        return np.concatenate([np.full((len(p), 1), np.inf), np.minimum.accumulate(p, axis=1)], axis=1)


def fidelity_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Synthetic store rows: a sparse answer keeps the dense one when difficulty + noise < the level's cut."""
    levels = np.array([0.0, 0.5, 0.7, 0.9])
    d = rng.normal(size=n)
    out = []
    for i in range(n):
        feats = {f"f_{name}": 0.0 for name in FEATURE_NAMES}
        feats.update(f_log_length=7.0, **{f"f_{FEATURE_NAMES[1]}": d[i] + rng.normal(scale=0.5)})
        for k, lv in enumerate(levels):
            keep = k == 0 or d[i] + rng.normal(scale=0.3) < LatentPolicy.CUT[k - 1]
            out.append({"sample_id": f"s{i}", "group": f"s{i}", "task": "vt", "level": lv, "n_tokens": 1000,
                        "target_length": 1000, "answer": "X1 X2" if keep else "X1", "score": np.nan, "outputs": [],
                        "nll_dense_answer": 1.0 + rng.uniform(0, 0.05), "nll_gold": np.nan,
                        "kept_blocks_all": 100 * (1 - lv), "causal_blocks_all": 100.0, "achieved_sparsity": lv, **feats})
    return pd.DataFrame(out)


def test_learn_then_test_on_fidelity_labels_holds_over_repeated_draws():
    """P(violation rate on fresh traffic > alpha) <= delta (+ sampling slack) over 120 calibration draws."""
    rng = np.random.default_rng(2)
    alpha, delta, trials, failures = 0.1, 0.2, 120, 0
    test = arrays_from_frame(apply_criterion(fidelity_frame(3000, rng), FIDELITY))
    assert 0.2 < test.safe[:, 1:].mean() < 0.8
    policy = LatentPolicy()
    for _ in range(trials):
        cal = arrays_from_frame(apply_criterion(fidelity_frame(150, rng), FIDELITY))
        c = calibrate(policy, cal, alpha, delta)
        failures += violations(test, c.decide(policy.scores(test.features))).mean() > alpha
    assert failures / trials <= delta + 0.05


def write_prompts(tokenizer, path, n, seed=5, task="niah_single"):
    gen = build_task(TaskSpec(task))
    with open(path, "w") as f:
        for i in range(n):
            s = generate_sample(task, gen, tokenizer, 256 + 64 * (i % 3), i, seed)
            f.write(json.dumps({"input": s.input, "answer_prefix": s.answer_prefix}) + "\n")


def test_prompts_without_outputs_label_calibrate_checkpoint(tiny_lm, tiny_trained, tmp_path, capsys):
    _, _, ckpt, _, _ = tiny_trained
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "mine" / "checkpoint"
    write_prompts(tiny_lm.tokenizer, prompts, 24)
    assert calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out) and lines[-2].startswith("certified: ") and "criterion divergence" in lines[-2]
    assert "no benchmark timings are recorded for this model, so the time saved is unknown" in lines[-2]
    store = LabelStore(str(out) + ".labels").table()
    assert store["sample_id"].nunique() == 24 and store["nll_gold"].isna().all() and store["score"].isna().all()
    new, old = load_checkpoint(out), load_checkpoint(ckpt)
    data = new.record["calibration_data"]
    assert data["requests"] == 24 and data["criterion"]["name"] == "divergence" == new.record["criterion"]["name"]
    # the default criterion's threshold comes from these prompts' own noise floor (24 prompts: every one has it)
    measure, q = LABEL_FREE_DEFAULT["measure"], LABEL_FREE_DEFAULT["null_quantile"]
    assert store.groupby("sample_id")[f"null_{measure}"].first().notna().all()
    assert new.record["criterion"]["threshold"] == null_threshold(store, measure, q)
    assert data["files"][0]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert data["tokens"] == [int(store["n_tokens"].min()), int(store["n_tokens"].max())]
    assert [new.guard.min_tokens, new.guard.max_tokens] == data["tokens"]
    assert new.record["recalibrated_from"]["calibration"] == old.record["calibration"]
    for name, tensor in new.net.state_dict().items():   # only the threshold and the guard changed
        assert torch.equal(tensor, old.net.state_dict()[name])
    assert (out / "calibration.md").read_text().splitlines()[2] == lines[-2]
    with attach(tiny_lm, out, break_even=None) as handle:
        tiny_lm.model.generate(torch.tensor([tiny_lm.tokenizer(prompts.read_text().splitlines()[0])["input_ids"][:300]]),
                               max_new_tokens=2, do_sample=False)
        assert len(handle.last_decisions) == 1
    mass = tmp_path / "mass" / "checkpoint"   # the other deployable policy, on the same (resumed) labels
    assert calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(mass), "--labels",
                               str(out) + ".labels", "--policy", "mass_coverage"]) == 0
    assert load_checkpoint(mass).record["policy"] == "mass_coverage" and "deploying mass_coverage" in capsys.readouterr().out
    with attach(tiny_lm, mass, break_even=None) as handle:
        tiny_lm.model(input_ids=torch.tensor([tiny_lm.tokenizer(prompts.read_text().splitlines()[1])["input_ids"][:300]]))
        d = handle.last_decisions[0]
        assert d.fallback is None or d.ood
        assert 0.0 <= d.probability <= 1.0
    edge = int(store["n_tokens"].median())   # two length strata, each certified on its own prompts
    strat = tmp_path / "strata" / "checkpoint"
    assert calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(strat), "--labels",
                               str(out) + ".labels", "--policy", "controller", "--length-strata", str(edge)]) == 0
    cal = load_checkpoint(strat).calibration
    assert cal.edges == (edge,) and [p.n for p in cal.parts] == [(store.groupby("sample_id")["n_tokens"].first() <= edge).sum(),
                                                                  (store.groupby("sample_id")["n_tokens"].first() > edge).sum()]
    assert f"<={edge}" in capsys.readouterr().out
    again = tmp_path / "again" / "checkpoint"   # 'checkpoint' keeps a stratified checkpoint's strata
    assert calibrate_cli.main(["--checkpoint", str(strat), "--prompts", str(prompts), "--out", str(again), "--labels",
                               str(out) + ".labels", "--policy", "controller", "--length-strata", "checkpoint"]) == 0
    assert load_checkpoint(again).calibration.edges == (edge,)
    plain = tmp_path / "plain" / "checkpoint"   # the default certifies one threshold for the prompts' mix
    assert calibrate_cli.main(["--checkpoint", str(strat), "--prompts", str(prompts), "--out", str(plain), "--labels",
                               str(out) + ".labels", "--policy", "controller"]) == 0
    assert load_checkpoint(plain).calibration.parts == ()
    report = tmp_path / "eval"
    assert eval_cli.main(["--checkpoint", str(out), "--prompts", str(prompts), "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["criterion"]["name"] == "divergence" and "divergence" in (report / "report.md").read_text()
    assert metrics["policies"]["controller"]["n"] == 24 and 0 <= metrics["shift"]["flagged_share"] <= 1
    assert "covered by the guarantee" in (report / "report.md").read_text()
    # issue 30: the label-free checkpoint judged by task truth on requests that have answers; its
    # calibration prompts have none, so the baselines are calibrated under its own criterion, and said so
    gold = tmp_path / "eval_gold"
    assert eval_cli.main(["--checkpoint", str(out), "--labels", str(tiny_trained[1].root), "--criterion", "gold",
                          "--out", str(gold)]) == 0, capsys.readouterr().err
    metrics = json.loads((gold / "metrics.json").read_text())
    assert metrics["criterion"]["name"] == "gold" and "checkpoint's own criterion divergence" in metrics["calibrated_on"]
    assert "have no reference outputs" in (gold / "report.md").read_text()


def test_calibrate_bad_input_one_line_exit_2_nothing_written(tiny_lm, tiny_trained, tmp_path, capsys):
    _, _, ckpt, _, _ = tiny_trained
    prompts, bad = tmp_path / "p.jsonl", tmp_path / "bad.jsonl"
    write_prompts(tiny_lm.tokenizer, prompts, 4)
    bad.write_text('{"input": "ok"}\n{"inputs": "typo"}\n')
    (tmp_path / "file").write_text("x")
    delta = load_checkpoint(ckpt).record["delta"]   # two candidate policies: each is tested at delta / 2
    need = min_requests(0.3, delta / 2)
    cases = [(["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--alpha", "0.05"],
              f"needs at least {min_requests(0.05, delta / 2)}"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--alpha", "0.05", "--policy", "controller"],
              f"needs at least {min_requests(0.05, delta)}"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--max-requests", "2"], f"needs at least {need}"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--criterion", "gold"], "no `outputs`"),
             (["--prompts", str(bad), "--out", str(tmp_path / "o")], "bad.jsonl:2"),
             (["--prompts", str(prompts), "--out", str(ckpt)], "is the input checkpoint"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "file")], "is a file"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--delta", "1.5"], "must lie in (0, 1)"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--length-strata", "2k"], "comma-separated token"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--length-strata", "4096,2048"], "increasing positive"),
             # issue 30: a bound beyond int64 gave an OverflowError traceback
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--length-strata", "9" * 23], "longer than any context"),
             (["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "smollm2-135m", "--alpha", "0.9"],
              "is not the model the controller was trained for")]
    for args, needle in cases:
        assert calibrate_cli.main(["--checkpoint", str(ckpt), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.labels").exists()


def test_hook_runs_long_and_off_support_requests_at_the_fallback(tiny_lm, tiny_trained):
    job, _, ckpt, _, _ = tiny_trained
    tok = tiny_lm.tokenizer
    ids = torch.tensor([tok(("The quick brown fox jumps over the lazy dog. " * 200))["input_ids"]])
    max_tokens = load_checkpoint(ckpt).guard.max_tokens
    assert ids.shape[1] > max_tokens
    dense = tiny_lm.model(input_ids=ids[:, :max_tokens - 4]).logits
    with attach(tiny_lm, ckpt, break_even=None) as handle:
        tiny_lm.model.generate(ids, max_new_tokens=2, do_sample=False)
        d = handle.last_decisions[0]
        assert d.ood and d.level == 0.0 and "outside the calibrated range" in d.fallback
        # a guard calibrated on features far from this request's: the request is off-support
        short = ids[:, :handle.guard.max_tokens - 4]
        far = np.tile(handle.guard.mean + 50 * handle.guard.std, (60, 1))
        far[:, FEATURE_NAMES.index("log_length")] = np.log(short.shape[1])
        noise = 0.1 * handle.guard.std * np.random.default_rng(0).normal(size=far.shape)
        handle.guard = ShiftGuard.fit(far + noise, np.full(60, short.shape[1]),
                                      handle.guard.mean, handle.guard.std, p_min=0.05, fallback=0.5)
        tiny_lm.model(input_ids=short)
        d = handle.last_decisions[0]
        assert d.ood and d.level == 0.5 and d.p_value < 0.05 and "off the calibrated support" in d.fallback

        class Broken:
            def check(self, features):
                raise RuntimeError("guard broke")
        handle.guard = Broken()
        logits = tiny_lm.model(input_ids=short).logits
        assert handle.last_decisions[0].level == 0.0 and "guard broke" in handle.last_decisions[0].fallback
    assert torch.allclose(logits, dense, atol=1e-5)


def test_gold_criterion_refuses_a_store_without_outputs(tiny_lm, tiny_trained, tmp_path, capsys):
    _, _, ckpt, _, _ = tiny_trained
    prompts = tmp_path / "p.jsonl"
    write_prompts(tiny_lm.tokenizer, prompts, 24)
    out = tmp_path / "c"
    assert calibrate_cli.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(UserError, match="no reference outputs"):
        arrays_from_store(str(out) + ".labels", {"tau": 0.1, "nll_reference": "gold", "require_score": True})
    assert eval_cli.main(["--checkpoint", str(out), "--prompts", str(prompts), "--out", str(tmp_path / "e"),
                          "--criterion", "gold"]) == 2
    assert "no reference outputs" in capsys.readouterr().err
