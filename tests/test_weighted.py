"""Weighted Learn-then-Test: calibration labels reweighed toward live features keep the bound under
covariate shift where the plain threshold breaks it, and a shift too far is refused in one line."""
import numpy as np
import pytest

from controller.guarantee.calibrate import calibrate, violations
from controller.guarantee.weighted import density_ratios, effective_size, weighted_calibrate
from data.errors import UserError

from test_controller import LEVELS, synthetic
from test_crc import _ScorePolicy

X = 5   # the feature column that carries the shift


def _traffic(seed: int, n: int, shift: float):
    """P(safe at a level) falls with the covariate x; the policy's scores ignore x (miscalibrated
    where x is large), so moving x moves the violation rate of a fixed threshold."""
    rng = np.random.default_rng(seed)
    arrays = synthetic(n, rng)
    x = rng.normal(loc=shift, size=n)
    arrays.features[:, X] = x
    logit = 2.5 - 4.0 * LEVELS[None, :] - 1.5 * x[:, None]
    u = rng.uniform(size=n)[:, None]   # one draw per request: safe levels form a prefix
    arrays.safe[:] = u < 1 / (1 + np.exp(-logit))
    arrays.safe[:, 0] = True
    arrays.features[:, 1:1 + len(LEVELS)] = 2.5 - 4.0 * LEVELS[None, :] + rng.normal(scale=0.3, size=(n, len(LEVELS)))
    return arrays


def test_weights_recover_the_live_rate_where_the_plain_threshold_breaks():
    policy, alpha, delta = _ScorePolicy(), 0.1, 0.1
    plain_risk, weighted_risk = [], []
    for seed in range(6):
        cal, live = _traffic(seed, 1500, 0.0), _traffic(100 + seed, 1500, 0.8)
        w, info = density_ratios(cal.features, live.features, seed)
        assert info["auc"] > 0.6 and 50 < info["effective_size"] < len(cal)
        plain = calibrate(policy, cal, alpha, delta)
        weighted = weighted_calibrate(policy, cal, w, alpha, delta, min_size=22)
        for c, out in ((plain, plain_risk), (weighted, weighted_risk)):
            out.append(violations(live, c.decide(policy.scores(live.features), live.n_tokens)).mean())
    assert np.mean(plain_risk) > alpha          # the shift breaks the plain certificate...
    assert max(weighted_risk) <= alpha          # ...the reweighed one holds on the live traffic


def test_no_shift_gives_near_uniform_weights_and_too_far_is_refused():
    cal, same = _traffic(0, 1500, 0.0), _traffic(1, 1500, 0.0)
    w, info = density_ratios(cal.features, same.features)
    assert abs(info["auc"] - 0.5) < 0.06 and effective_size(w) > 0.8 * len(w)
    w, info = density_ratios(cal.features, _traffic(2, 1500, 2.5).features)   # little overlap
    assert info["effective_size"] < 59 and info["auc"] < 0.98
    with pytest.raises(UserError, match="effective sample size") as e:
        weighted_calibrate(_ScorePolicy(), cal, w, 0.05, 0.1, min_size=59)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="separable"):                        # none at all
        density_ratios(cal.features, _traffic(3, 1500, 8.0).features)
    with pytest.raises(UserError, match="at least 20"):
        density_ratios(cal.features[:5], same.features)


def test_reweighing_a_checkpoint_toward_unlabeled_prompts(tiny_trained, tiny_lm, tmp_path, capsys):
    """calibrate.py --reweigh (issue 29 item 3): the record says what was reweighed and how far; traffic
    separable from the calibration requests, or too little of it, is refused in one line."""
    import calibrate as calibrate_cli
    from controller.runtime.checkpoint import load_checkpoint
    from controller.learning.pipeline import calibration_arrays
    from controller.guarantee.reweigh import reweighed_record
    from data.criteria import criterion_dict
    from data.errors import UserError
    _, _, ckpt_dir, _, _ = tiny_trained
    ckpt = load_checkpoint(ckpt_dir)
    _, cal, _ = calibration_arrays(ckpt.record, criterion_dict(ckpt.record["criterion"]), ckpt_dir)
    big = cal.subset(np.arange(400) % len(cal))   # the tiny store's calibration requests, repeated
    rng = np.random.default_rng(0)
    big.features = big.features + rng.normal(0, 0.05, big.features.shape).astype(np.float32)
    live = big.features[rng.integers(0, len(big), 200)] + rng.normal(0, 0.05, (200, big.features.shape[1]))
    record, line = reweighed_record(ckpt, big, live, 0.2, 0.2, {"source": "test"})
    assert record["calibration_data"]["reweighed"]["effective_size"] > 100 and "reweighed, approximate" in line
    assert record["alpha"] == 0.2 and record["recalibrated_from"]["calibration"] == ckpt.record["calibration"]
    with pytest.raises(UserError, match="separable"):
        reweighed_record(ckpt, big, live + 50.0, 0.2, 0.2, {"source": "test"})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input": "a short prompt about nothing"}\n' * 3)
    code = calibrate_cli.main(["--checkpoint", str(ckpt_dir), "--prompts", str(prompts), "--out",
                               str(tmp_path / "out"), "--reweigh", "--model", "tiny-random-llama"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "at least 20" in err, err
    assert not (tmp_path / "out").exists()
