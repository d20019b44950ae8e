"""Adapt, not only re-threshold (issue 29 item 4): a head refitted on half of a user's labeled
requests, certified on the other half, offered as one more candidate of the recalibration."""
import numpy as np
import pytest

from data.features import FEATURE_NAMES


def _shifted(cal, n: int, seed: int):
    """Requests whose safe level is set by one feature the tiny net never learned: the net ranks them
    at random, a refitted head can rank them well."""
    out = cal.subset(np.arange(n) % len(cal))
    rng = np.random.default_rng(seed)
    out.features = out.features.copy()
    x = rng.uniform(size=n)
    out.features[:, FEATURE_NAMES.index("unique_token_ratio")] = x
    top = np.floor(x * len(out.levels)).astype(int)   # the highest safe level index
    out.safe = np.arange(len(out.levels))[None, :] <= top[:, None]
    out.sample_ids = np.array([f"r{seed}-{i}" for i in range(n)])
    return out


def test_the_adapted_head_is_certified_on_requests_it_was_not_fitted_on_and_deployed_when_it_saves_more(
        tiny_trained, tmp_path):
    from controller.learning.evaluate import policy_metrics
    from controller.runtime.checkpoint import export_checkpoint, load_checkpoint
    from controller.guarantee.guard import Guarded
    from controller.learning.pipeline import calibration_arrays
    from controller.runtime.policy import AdaptedPolicy, ComputeAware, deployed_policy
    from controller.guarantee.recalibrate import recalibrate
    from data.criteria import criterion_dict
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    crit = criterion_dict(ckpt.record["criterion"])
    _, cal, _ = calibration_arrays(ckpt.record, crit, ckpt_dir)
    r = recalibrate(ckpt, _shifted(cal, 400, 0), 0.1, 0.1, crit, {"source": "test"})
    cands = r.summary["candidates"]
    assert "adapted" in cands and r.record["policy"] == "adapted"
    assert r.record["adapter"]["fitted_on"] == 200 and cands["adapted"]["calibration"]["n"] == 200
    assert cands["adapted"]["compute_saved"] > cands["controller"]["compute_saved"]
    path = export_checkpoint(tmp_path / "adapted", ckpt.net, r.record)
    again = load_checkpoint(path)   # the head travels as JSON numbers and rebuilds the policy
    policy = deployed_policy(again.net, again.levels, again.record)
    assert again.record["policy_decision"] == ckpt.record["decision"] == "compute_aware"
    assert isinstance(policy, ComputeAware) and isinstance(policy.base, AdaptedPolicy)
    over = 0
    for seed in range(8):   # the promise is per draw of calibration requests: P(rate > alpha) <= delta
        r = recalibrate(ckpt, _shifted(cal, 400, 100 + seed), 0.1, 0.1, crit, {"source": "test"})
        fresh = _shifted(cal, 2000, 200 + seed)
        policy = deployed_policy(ckpt.net, ckpt.levels, r.record)
        chosen = r.calibration.decide(Guarded(policy, r.guard, ckpt.levels).scores(fresh.features), fresh.n_tokens)
        m = policy_metrics(fresh, chosen)
        over += m["violation_rate"] > 0.1
        assert m["compute_saved"] > 0
    assert over <= 2   # delta 0.1 of 8 draws is 0.8; 2 leaves room for chance, not for a broken certificate


def test_too_few_requests_for_two_halves_are_refused_when_adapted_is_asked_for(tiny_trained):
    from controller.runtime.checkpoint import load_checkpoint
    from controller.learning.pipeline import calibration_arrays
    from controller.guarantee.recalibrate import recalibrate
    from data.criteria import criterion_dict
    from data.errors import UserError
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    crit = criterion_dict(ckpt.record["criterion"])
    _, cal, _ = calibration_arrays(ckpt.record, crit, ckpt_dir)
    with pytest.raises(UserError, match="half to fit"):
        recalibrate(ckpt, _shifted(cal, 60, 0), 0.1, 0.1, crit, {"source": "test"}, choice="adapted")
    for n in (60, 399):   # auto offers it from AUTO_MIN requests on
        r = recalibrate(ckpt, _shifted(cal, n, 0), 0.1, 0.1, crit, {"source": "test"})
        assert "adapted" not in r.summary["candidates"]
    r = recalibrate(ckpt, _shifted(cal, 200, 0), 0.1, 0.1, crit, {"source": "test"}, choice="adapted")
    assert r.record["policy"] == "adapted" and set(r.summary["candidates"]) == {"adapted"}


@pytest.mark.parametrize("choice", ["mass_coverage", "adapted", "controller"])
def test_every_candidate_runs_under_the_checkpoints_rule_and_deploys_as_certified(tiny_trained, choice):
    """A recalibration certifies each candidate under the checkpoint's decision rule and records it
    (`policy_decision`); the policy rebuilt from the record makes the decisions that were certified:
    its violation rate on the calibration requests is the certificate's empirical risk."""
    from controller.guarantee.calibrate import violations
    from controller.learning.adapt import split_halves
    from controller.learning.pipeline import calibration_arrays
    from controller.runtime.checkpoint import load_checkpoint
    from controller.runtime.policy import ComputeAware, LearnedPolicy, MassCoveragePolicy, deployed_policy
    from controller.guarantee.recalibrate import recalibrate
    from data.criteria import criterion_dict
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    crit = criterion_dict(ckpt.record["criterion"])
    _, cal, _ = calibration_arrays(ckpt.record, crit, ckpt_dir)
    reqs = _shifted(cal, 400, 3)
    r = recalibrate(ckpt, reqs, 0.2, 0.1, crit, {"source": "test"}, choice=choice)
    assert r.record["policy"] == choice and r.record["policy_decision"] == ckpt.record["decision"] == "compute_aware"
    policy = deployed_policy(ckpt.net, ckpt.levels, r.record)
    assert isinstance(policy, ComputeAware)
    assert isinstance(policy.base, {"mass_coverage": MassCoveragePolicy, "controller": LearnedPolicy}.get(
        choice, type(policy.base)))
    part = reqs.subset(split_halves(len(reqs))[1]) if choice == "adapted" else reqs   # the rows it was certified on
    risk = violations(part, r.calibration.decide(policy.scores(part.features), part.n_tokens)).mean()
    assert r.calibration.passed and risk == pytest.approx(r.calibration.empirical_risk)
    before = {k: v for k, v in r.record.items() if k != "policy_decision"}   # a record from before the key
    old = deployed_policy(ckpt.net, ckpt.levels, before)
    assert not isinstance(old, ComputeAware) or choice == "controller"


def test_the_hook_decides_a_compute_aware_mass_coverage_checkpoint_and_reports_the_kept_mass(tiny_trained, tmp_path):
    """The deployed mass-coverage rule under the compute-aware decision: the hook's decision is the
    calibrated one, and the number it reports beside it is the probe's kept mass at that level, in [0, 1]
    (not the compute-aware ratio it was decided on)."""
    from controller.learning.pipeline import calibration_arrays
    from controller.runtime.checkpoint import export_checkpoint, load_checkpoint
    from controller.runtime.deciding import Decider
    from controller.runtime.policy import deployed_policy, kept_mass
    from controller.guarantee.recalibrate import recalibrate
    from data.criteria import criterion_dict
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    crit = criterion_dict(ckpt.record["criterion"])
    _, cal, _ = calibration_arrays(ckpt.record, crit, ckpt_dir)
    reqs = _shifted(cal, 400, 5)
    r = recalibrate(ckpt, reqs, 0.2, 0.1, crit, {"source": "test"}, choice="mass_coverage")
    mass_ckpt = load_checkpoint(export_checkpoint(tmp_path / "mass", ckpt.net, r.record))
    idx, reported, p_all = Decider(mass_ckpt, None).decide(reqs.features, reqs.n_tokens)
    policy = deployed_policy(mass_ckpt.net, mass_ckpt.levels, mass_ckpt.record)
    assert p_all is None and (idx > 0).any()
    assert np.array_equal(idx, r.calibration.decide(policy.scores(reqs.features), reqs.n_tokens))
    assert np.allclose(reported, kept_mass(policy, reqs.features)[np.arange(len(idx)), idx])
    assert ((0 <= reported) & (reported <= 1)).all()
