"""The expected-risk mode (conformal risk control) beside Learn-then-Test: what it promises holds on
average over calibration draws, it is never more conservative than LTT, and it travels in the
checkpoint and the report."""
import numpy as np
import pytest

from controller.guarantee.calibrate import Calibration, calibrate, violations
from controller.learning.baselines import FixedPolicy
from controller.runtime.policy import LearnedPolicy

from test_controller import LEVELS, synthetic


class _ScorePolicy(LearnedPolicy):
    """P(safe) given directly as a feature column (a policy whose scores we control)."""
    def __init__(self):
        self.name, self.lambdas = "scores", np.linspace(1.0, 0.0, 41)

    def scores(self, features):
        p = 1 / (1 + np.exp(-features[:, 1:1 + len(LEVELS)]))
        p[:, 0] = 1.0
        return np.minimum.accumulate(p, axis=1)

    def per_request(self):
        return self


def _draw(seed: int, n: int):
    rng = np.random.default_rng(seed)
    arrays = synthetic(n, rng)
    logits = np.where(arrays.safe, 1.5, -1.5) + rng.normal(scale=1.5, size=arrays.safe.shape)   # informative, noisy
    arrays.features[:, 1:1 + len(LEVELS)] = logits
    return arrays


def test_crc_controls_the_expected_rate_and_is_no_more_conservative_than_ltt():
    policy, alpha = _ScorePolicy(), 0.1
    test_risk, saved = [], {"crc": [], "ltt": []}
    for seed in range(200):
        cal, test = _draw(seed, 150), _draw(10_000 + seed, 400)
        crc = calibrate(policy, cal, alpha, 0.1, mode="crc")
        ltt = calibrate(policy, cal, alpha, 0.1, mode="ltt")
        assert crc.mode == "crc" and ltt.mode == "ltt"
        assert (not ltt.passed) or (crc.passed and crc.threshold <= ltt.threshold)   # crc at least as aggressive
        chosen = crc.decide(policy.scores(test.features), test.n_tokens)
        test_risk.append(violations(test, chosen).mean())
        for name, c in (("crc", crc), ("ltt", ltt)):
            saved[name].append(LEVELS[c.decide(policy.scores(test.features), test.n_tokens)].mean())
    assert np.mean(test_risk) <= alpha   # E[rate] <= alpha, over 200 calibration draws
    assert np.mean(saved["crc"]) > np.mean(saved["ltt"])


def test_crc_travels_in_the_checkpoint_record_and_bad_modes_are_refused():
    c = calibrate(_ScorePolicy(), _draw(0, 150), 0.1, 0.1, mode="crc")
    back = Calibration.from_json(c.to_json())
    assert back == c and back.mode == "crc"
    old = {k: v for k, v in c.to_json().items() if k != "mode"}
    assert Calibration.from_json(old).mode == "ltt"   # records written before the mode existed are LTT
    with pytest.raises(ValueError, match="mode must be one of"):
        Calibration.from_json({**c.to_json(), "mode": "vibes"})
    with pytest.raises(ValueError, match="mode must be one of"):
        calibrate(FixedPolicy(LEVELS), _draw(0, 50), 0.1, 0.1, mode="vibes")
    from controller.learning.config import CalibrationConfig
    from data.errors import UserError
    with pytest.raises(UserError, match="calibration.mode"):
        CalibrationConfig(mode="vibes")
