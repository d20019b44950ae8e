"""Calibration with Learn-then-Test: pick the most aggressive threshold whose violation rate is
provably at most alpha with probability 1 - delta.

Owns `violations` (a request violates when it fails the safety criterion at the level actually
chosen for it), `Calibration` (the result) and `calibrate`. For each threshold of a policy, ordered
from conservative to aggressive, the null hypothesis "violation rate > alpha" gets a
Hoeffding-Bentkus p-value (binary loss) and MAPIE's fixed-sequence procedure controls the
family-wise error at delta; the last rejected threshold is chosen. If none is rejected the policy
falls back to dense for everyone and `passed` is False. Imports `controller` modules below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dataset import LabelArrays
from .policies import Policy, decide


def violations(arrays: LabelArrays, chosen: np.ndarray) -> np.ndarray:
    """[n] bool: the request is unsafe at its chosen level index."""
    return ~arrays.safe[np.arange(len(arrays)), chosen]


@dataclass(frozen=True)
class Calibration:
    threshold: float          # +inf = always dense
    passed: bool
    alpha: float
    delta: float
    n: int
    empirical_risk: float     # on the calibration split at the chosen threshold
    tested: int               # thresholds rejected before the first failure

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return decide(scores, self.threshold) if self.passed else np.zeros(len(scores), dtype=int)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        t = d["threshold"]
        return cls(**{**d, "threshold": math.inf if t is None else float(t)})


def ltt_p_values(risks: np.ndarray, n: int, alpha: float) -> np.ndarray:
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
    return compute_hoeffding_bentkus_p_value(np.asarray(risks, dtype=float), n, alpha, binary=True)[:, 0]


def calibrate(policy: Policy, cal: LabelArrays, alpha: float, delta: float) -> Calibration:
    from mapie.risk_control import control_fwer
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    scores = policy.scores(cal.features)
    risks = np.array([violations(cal, decide(scores, lam)).mean() for lam in policy.lambdas])
    rejected = control_fwer(ltt_p_values(risks, len(cal), alpha), delta, "fixed_sequence")
    if len(rejected) == 0:
        return Calibration(math.inf, False, alpha, delta, len(cal), 0.0, 0)
    last = int(np.max(rejected))
    return Calibration(float(policy.lambdas[last]), True, alpha, delta, len(cal), float(risks[last]), len(rejected))
