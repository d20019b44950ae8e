"""Baseline policies fitted or fixed offline, calibrated the same way as the controller (reports
compare the controller with them; none ships at inference).

Owns `SklearnPolicy` (logistic regression, gradient boosting: one classifier per level, made
monotone), `FixedPolicy` (one level for all), `LengthLawPolicy` (level = a + b log n fitted on
training labels, shifted by lam) and `oracle_decisions` (the labels). Imports `data` and the
`controller.runtime.policy` interface.
"""
from __future__ import annotations

import numpy as np

from controller.guarantee.arrays import LabelArrays
from controller.runtime.policy import LOG_LENGTH, PROBABILITY_LAMBDAS, Policy, with_dense


class SklearnPolicy(Policy):
    """One scikit-learn classifier per sparse level for P(label >= level)."""
    KINDS = ("logistic", "gbm")

    def __init__(self, kind: str, seed: int = 0):
        self.kind, self.seed, self.name = kind, seed, f"sklearn_{kind}"
        self.lambdas = PROBABILITY_LAMBDAS
        self.models: list = []

    def _make(self):
        from sklearn.ensemble import GradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        if self.kind == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        return GradientBoostingClassifier(n_estimators=150, max_depth=2, learning_rate=0.05, subsample=0.8,
                                          random_state=self.seed)

    def fit(self, train: LabelArrays) -> "SklearnPolicy":
        label = train.label_index
        self.models = []
        for k in range(1, len(train.levels)):
            y = (label >= k).astype(int)
            self.models.append(float(y[0]) if y.min() == y.max() else self._make().fit(train.features, y))
        return self

    def scores(self, features: np.ndarray) -> np.ndarray:
        cols = [np.full(len(features), m) if isinstance(m, float) else m.predict_proba(features)[:, 1]
                for m in self.models]
        return with_dense(np.stack(cols, axis=1))


class FixedPolicy(Policy):
    """The same level for every request; lam walks up the grid."""
    name = "fixed"

    def __init__(self, levels: np.ndarray):
        self.levels = np.asarray(levels, dtype=np.float64)
        self.lambdas = 1.0 - self.levels[1:]

    def scores(self, features: np.ndarray) -> np.ndarray:
        return with_dense(np.tile(1.0 - self.levels[1:], (len(features), 1)))


class LengthLawPolicy(Policy):
    """level(n) = a + b log n (least squares on the training labels); decision = the largest grid
    level <= level(n) - lam."""
    name = "length_law"

    def __init__(self, levels: np.ndarray):
        self.levels = np.asarray(levels, dtype=np.float64)
        self.a = self.b = 0.0
        self.lambdas = np.round(np.linspace(1.0, -1.0, 401), 4)

    def fit(self, train: LabelArrays) -> "LengthLawPolicy":
        x = train.features[:, LOG_LENGTH].astype(np.float64)
        y = self.levels[train.label_index]
        self.b, self.a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
        return self

    def scores(self, features: np.ndarray) -> np.ndarray:
        predicted = self.a + self.b * np.asarray(features)[:, LOG_LENGTH].astype(np.float64)
        return with_dense(predicted[:, None] - self.levels[None, 1:])


def oracle_decisions(arrays: LabelArrays) -> np.ndarray:
    return arrays.label_index
