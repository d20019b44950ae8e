"""Adapt, not only re-threshold: refit a head on the controller for a user's labeled prompts.

`fit_head` fits, per sparse level, a logistic model of "safe at this level" on the standardised
non-task features and the net's logit (`policies.AdaptedPolicy`). `recalibrate` offers it as one more
candidate, cross-fitted: the head is fitted on a seeded half of the calibration requests and
certified on the other half only, so its certificate rests on requests it never saw; with every
candidate tested at delta / (number of candidates), deploying whichever saves most keeps the
guarantee. Imports numpy, scikit-learn and `controller` modules below it (training side).
"""
from __future__ import annotations

import numpy as np

from data.features import FEATURE_NAMES

from controller.guarantee.arrays import LabelArrays
from controller.runtime.policy import TASK_COLUMNS, AdaptedPolicy, LearnedPolicy, head_inputs

HEAD_COLUMNS = [i for i in range(len(FEATURE_NAMES)) if i not in TASK_COLUMNS]
MIN_FIT = 40   # requests the head is fitted on, at least
# `auto` offers the head from this many calibration requests on. With 200 (100 to fit, 100 to certify)
# it won no held-out family of store v2 and its share of delta cost qa 22% -> 18% of the oracle
# (docs/results/holdout_family_adapted.md); `--policy adapted` asks for it at any size >= 2 * MIN_FIT.
AUTO_MIN = 400


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, certify rows): a seeded split in two halves."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def fit_head(base: LearnedPolicy, fit: LabelArrays, C: float = 0.5) -> dict:
    """The head's numbers (JSON-ready) from the requests `fit`: one logistic model per sparse level of
    "this level and every lower one are safe" (the label's own meaning)."""
    from sklearn.linear_model import LogisticRegression
    feats = np.asarray(fit.features, np.float64)
    mean, std = feats[:, HEAD_COLUMNS].mean(0), feats[:, HEAD_COLUMNS].std(0) + 1e-6
    x = head_inputs(feats, base.probabilities(fit.features), HEAD_COLUMNS, mean, std)
    coef, intercept = [], []
    for k in range(x.shape[1]):
        y = fit.label_index >= k + 1
        if y.all() or not y.any():   # one class: a constant, smoothed toward the other
            rate = (y.sum() + 0.5) / (len(y) + 1.0)
            coef.append([0.0] * x.shape[2])
            intercept.append(float(np.log(rate / (1 - rate))))
            continue
        m = LogisticRegression(C=C, max_iter=1000).fit(x[:, k, :], y)
        coef.append([float(c) for c in m.coef_[0]])
        intercept.append(float(m.intercept_[0]))
    return {"columns": HEAD_COLUMNS, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "coef": coef, "intercept": intercept, "fitted_on": int(len(fit))}


def adapted_candidate(base: LearnedPolicy, cal: LabelArrays, seed: int = 0):
    """(policy, head, certify rows) of the cross-fitted candidate, or None with too few requests."""
    fit_rows, certify_rows = split_halves(len(cal), seed)
    if len(fit_rows) < MIN_FIT:
        return None
    head = fit_head(base, cal.subset(fit_rows))
    return AdaptedPolicy(base, head), head, certify_rows
