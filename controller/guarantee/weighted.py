"""Recertification under covariate shift without new labels: weighted Learn-then-Test.

Owns `density_ratios` (w(x) = p_live(x) / p_cal(x) for each labeled calibration request, from a logistic
classifier that tells calibration features from live ones, cross-fitted in two folds),
`effective_size` ((sum w)^2 / sum w^2) and `weighted_calibrate`. If the live traffic differs from the
calibration traffic only in its features' distribution (covariate shift: the chance that a level is
safe given the features is unchanged), the weighted violation rate of the calibration requests
estimates the live one (Almeida et al., "Conformal risk control under covariate shift", COPA 2025;
Tibshirani et al. 2019). Learn-then-Test then runs on the weighted rates with the effective sample
size in place of n: an approximation (the weights are estimated), stated as such, and refused when
the effective size is below what Learn-then-Test needs with zero violations. Imports numpy,
scikit-learn and `controller` modules below it.
"""
from __future__ import annotations

import math

import numpy as np

from data.errors import UserError

from controller.guarantee.calibrate import Calibration, ltt_p_values, violations
from controller.guarantee.arrays import LabelArrays
from controller.runtime.policy import Policy, decide

MAX_AUC = 0.98   # a classifier this sure which side a request is on leaves no overlap to reweigh

def density_ratios(reference: np.ndarray, live: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Weights of the `reference` (calibration) rows toward `live`, mean 1; and a summary (the
    held-out classifier AUC: 0.5 = no shift; the effective size)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    a, b = np.asarray(reference, np.float64), np.asarray(live, np.float64)
    if len(a) < 20 or len(b) < 20:
        raise UserError(f"weighting needs at least 20 calibration and 20 live requests, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    fold_a, fold_b = rng.integers(0, 2, len(a)), rng.integers(0, 2, len(b))
    w, scores, labels = np.ones(len(a)), [], []
    for k in (0, 1):   # fit on one fold, weigh the other: no request weighs itself
        x = np.concatenate([a[fold_a != k], b[fold_b != k]])
        y = np.concatenate([np.zeros((fold_a != k).sum()), np.ones((fold_b != k).sum())])
        # a linear log density ratio: smooth weights (a boosted classifier fits noise into them: with no
        # shift at all it cost a quarter of the effective sample size in the tests)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000))
        clf.fit(x, y)
        p = np.clip(clf.predict_proba(a[fold_a == k])[:, 1], 1e-6, 1 - 1e-6)
        w[fold_a == k] = p / (1 - p)   # balanced classes: the odds are the density ratio
        scores += [p, clf.predict_proba(b[fold_b == k])[:, 1]]
        labels += [np.zeros((fold_a == k).sum()), np.ones((fold_b == k).sum())]
    w = w / w.mean()   # not clipped: clipping would hide how little overlap there is (the effective size says it)
    auc = float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))
    if auc >= MAX_AUC:   # no overlap: a regularised classifier's odds would understate how extreme the weights are
        raise UserError(f"the live traffic is separable from the calibration requests (held-out AUC {auc:.3f}): "
                        "no reweighing can stand for it; calibrate on the live prompts instead (calibrate.py --prompts)")
    return w, {"auc": auc, "effective_size": effective_size(w), "n": len(w), "max_weight": float(w.max())}


def effective_size(w: np.ndarray) -> float:
    w = np.asarray(w, np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum()) if len(w) else 0.0


def weighted_calibrate(policy: Policy, cal: LabelArrays, weights: np.ndarray, alpha: float, delta: float,
                       min_size: int) -> Calibration:
    """Learn-then-Test on weighted violation rates, at the effective sample size; UserError when
    that size is below `min_size` (the fewest requests Learn-then-Test could certify with)."""
    w = np.asarray(weights, np.float64)
    n_eff = effective_size(w)
    if n_eff < min_size:
        raise UserError(f"the live traffic is too far from the calibration requests to reweigh them: effective sample "
                        f"size {n_eff:.0f} of {len(w)}, below the {min_size} Learn-then-Test needs at alpha={alpha:g}, "
                        f"delta={delta:g}; calibrate on the live prompts instead (calibrate.py --prompts)")
    from mapie.risk_control import control_fwer
    policy = policy.per_request()
    scores = policy.scores(cal.features)
    risks = np.array([np.average(violations(cal, decide(scores, lam)), weights=w) for lam in policy.lambdas])
    n = int(math.floor(n_eff))
    rejected = control_fwer(ltt_p_values(risks, n, alpha), delta, "fixed_sequence")
    if len(rejected) == 0:
        return Calibration(math.inf, False, alpha, delta, n, 0.0, 0)
    last = int(np.max(rejected))
    return Calibration(float(policy.lambdas[last]), True, alpha, delta, n, float(risks[last]), len(rejected))
