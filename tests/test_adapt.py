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
    from controller.runtime.policy import AdaptedPolicy, deployed_policy
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
    assert isinstance(policy, AdaptedPolicy)
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
