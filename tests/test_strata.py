"""Length-stratified calibration: one Learn-then-Test threshold per length stratum, so the bound
holds within every stratum, where one marginal threshold lets long, riskier requests exceed alpha."""
import json
import math

import numpy as np
import pytest

from controller.guarantee.calibrate import Calibration, calibrate, strata_of, violations
from controller.learning.config import CalibrationConfig
from controller.runtime.policy import Policy
from data.errors import UserError
from data.features import FEATURE_NAMES
from test_controller import LEVELS, synthetic

LONG, SHORT = 30000, 1000


def mixed(n: int, rng, long_share: float = 0.3) -> "LabelArrays":  # noqa: F821
    """Short requests are safe at a sparse level 97% of the time, long ones 55%."""
    long = rng.uniform(size=n) < long_share
    safe = np.ones((n, len(LEVELS)), dtype=bool)
    safe[:, 1:] = rng.uniform(size=(n, len(LEVELS) - 1)) < np.where(long, 0.55, 0.97)[:, None]
    a = synthetic(n, rng, safe=safe)
    a.n_tokens = np.where(long, LONG, SHORT)
    a.features[:, FEATURE_NAMES.index("log_length")] = np.log(a.n_tokens)
    return a


COLUMNS = [i for i, name in enumerate(FEATURE_NAMES) if name != "log_length"][:len(LEVELS) - 1]


class LengthBlind(Policy):
    """P(safe) that sees the truth only weakly and never the length (written into feature columns
    other than log_length, so it is a function of the features): its risk at a threshold is far
    higher on long requests than on short ones."""
    name = "blind"
    lambdas = np.round(np.linspace(1, 0, 101), 3)

    def __init__(self, arrays, rng):
        arrays.features[:, COLUMNS] = 0.3 * arrays.safe[:, 1:] + rng.uniform(0, 0.7, (len(arrays), len(LEVELS) - 1))

    def scores(self, features):
        p = features[:, COLUMNS].astype(np.float64)
        return np.concatenate([np.full((len(p), 1), np.inf), np.minimum.accumulate(p, axis=1)], axis=1)


def _risk_by_stratum(c: Calibration, test, rng) -> tuple[float, float, float]:
    chosen = c.decide(LengthBlind(test, rng).scores(test.features), test.n_tokens)
    v = violations(test, chosen)
    return v.mean(), v[test.n_tokens == SHORT].mean(), v[test.n_tokens == LONG].mean()


def test_one_threshold_lets_long_requests_exceed_alpha_and_strata_do_not():
    rng = np.random.default_rng(7)
    cal, test = mixed(3000, rng), mixed(20000, rng)
    marginal = calibrate(LengthBlind(cal, rng), cal, 0.05, 0.1)
    overall, short, long = _risk_by_stratum(marginal, test, rng)
    assert marginal.passed and overall <= 0.05 and long > 0.05   # the failure stratification exists for
    stratified = calibrate(LengthBlind(cal, rng), cal, 0.05, 0.1, edges=(8192,))
    assert [p.n for p in stratified.parts] == [(cal.n_tokens == SHORT).sum(), (cal.n_tokens == LONG).sum()]
    assert all(p.delta == pytest.approx(0.05) for p in stratified.parts)   # Bonferroni over 2 strata
    overall, short, long = _risk_by_stratum(stratified, test, rng)
    assert short <= 0.05 and long <= 0.05


def test_stratified_guarantee_holds_in_every_stratum_over_repeated_draws():
    rng = np.random.default_rng(11)
    alpha, delta, failures, trials = 0.1, 0.2, 0, 100
    for _ in range(trials):
        cal, test = mixed(800, rng), mixed(6000, rng)
        c = calibrate(LengthBlind(cal, rng), cal, alpha, delta, edges=(8192,))
        _, short, long = _risk_by_stratum(c, test, rng)
        failures += short > alpha or long > alpha
    assert failures / trials <= delta + 0.05


def test_a_stratum_without_calibration_requests_runs_dense():
    rng = np.random.default_rng(3)
    cal = mixed(400, rng, long_share=0.0)
    c = calibrate(LengthBlind(cal, rng), cal, 0.05, 0.1, edges=(8192,))
    assert c.parts[0].passed and not c.parts[1].passed and c.parts[1].n == 0 and math.isinf(c.threshold)
    test = mixed(500, rng, long_share=0.5)
    chosen = c.decide(LengthBlind(test, rng).scores(test.features), test.n_tokens)
    assert (chosen[test.n_tokens == LONG] == 0).all() and (chosen[test.n_tokens == SHORT] > 0).any()


def test_stratified_calibration_round_trips_and_needs_lengths():
    rng = np.random.default_rng(5)
    cal = mixed(600, rng)
    c = calibrate(LengthBlind(cal, rng), cal, 0.05, 0.1, edges=(2048, 8192))
    assert Calibration.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ValueError, match="token count"):
        c.decide(LengthBlind(cal, rng).scores(cal.features))
    bad = c.to_json()
    bad["parts"] = bad["parts"][:2]
    with pytest.raises(ValueError, match="one calibration per length stratum"):
        Calibration.from_json(bad)
    plain = calibrate(LengthBlind(cal, rng), cal, 0.05, 0.1)
    assert "parts" not in plain.to_json() and "edges" not in plain.to_json()   # old checkpoints' format


def test_strata_boundaries_are_inclusive_upper_bounds():
    assert strata_of([1, 2048, 2049, 8192, 8193, 10**6], (2048, 8192)).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("strata", [(0,), (4096, 2048), (2048, 2048), (1.5,), (True,), (10**23,)])
def test_bad_strata_are_refused(strata):
    with pytest.raises(UserError, match="length_strata"):
        CalibrationConfig(length_strata=strata)


def test_a_stream_monitors_warm_up_is_not_calibrated_on():
    """Calibrating a monitored policy certifies its per-request part (the guard): a warm-up covering
    every calibration request would make them all dense and certify the most aggressive threshold
    for the traffic after it."""
    import dataclasses

    from controller.guarantee.guard import Guarded, Monitored, ShiftGuard
    rng = np.random.default_rng(5)
    cal = mixed(600, rng)
    base = LengthBlind(cal, rng)
    width = cal.features.shape[1]
    guard = ShiftGuard.fit(cal.features, cal.n_tokens, np.zeros(width), np.ones(width), p_min=0.0)
    monitored = Monitored(base, dataclasses.replace(guard, warmup=10 ** 6), LEVELS)
    assert np.isneginf(monitored.scores(cal.features)[:, 1:]).all()   # the warm-up holds every request dense
    got, want = calibrate(monitored, cal, 0.05, 0.1), calibrate(Guarded(base, guard, LEVELS), cal, 0.05, 0.1)
    assert got.passed and got.threshold == want.threshold > min(base.lambdas)
