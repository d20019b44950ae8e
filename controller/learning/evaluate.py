"""Evaluating calibrated policies on labeled requests.

Owns `policy_metrics` (violation rate with its Clopper-Pearson interval, attention compute saved,
mean level and achieved sparsity, task accuracy relative to dense), `evaluate_all` (every policy,
overall, per task and per length bucket), `alpha_sweep` (recalibrate at each alpha: the
violation / compute-saved trade-off) and `reliability` (calibration of P(safe)).
compute_saved = 1 - sum over requests of the attention blocks computed at the chosen level (all
layers, dense ones included) / the same sum for dense causal attention: kept-block FLOPs, which
weights long requests by their quadratic cost. time_saved (given a benchmark's TimeTable): the same
sum in measured prefill milliseconds (controller.learning.timing). Imports `controller` modules below it.
"""
from __future__ import annotations

import math

import numpy as np

from controller.guarantee.calibrate import Calibration, calibrate, violations
from controller.guarantee.arrays import LabelArrays
from controller.runtime.policy import LearnedPolicy, Policy, decide
from controller.learning.baselines import oracle_decisions
from controller.learning.timing import TimeTable


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta
    if n == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def policy_metrics(arrays: LabelArrays, chosen: np.ndarray, times: TimeTable | None = None) -> dict:
    """Violations, compute saved and, given a benchmark's `times`, wall-clock `time_saved`."""
    rows = np.arange(len(arrays))
    bad = violations(arrays, chosen)
    dense_score = arrays.score[:, 0].sum()
    lo, hi = clopper_pearson(int(bad.sum()), len(arrays))
    return {
        "n": int(len(arrays)),
        "violation_rate": float(bad.mean()) if len(arrays) else math.nan,
        "violation_ci95": [lo, hi],
        "compute_saved": float(1.0 - arrays.kept[rows, chosen].sum() / arrays.causal.sum()) if len(arrays) else math.nan,
        "mean_level": float(arrays.levels[chosen].mean()) if len(arrays) else math.nan,
        "mean_achieved_sparsity": float(arrays.achieved[rows, chosen].mean()) if len(arrays) else math.nan,
        "accuracy_vs_dense": float(arrays.score[rows, chosen].sum() / dense_score) if dense_score > 0 else None,
        "dense_requests": float((chosen == 0).mean()) if len(arrays) else math.nan,
        **({"time_saved": times.saved(arrays.levels[chosen], arrays.n_tokens)} if times is not None else {}),
    }


def length_bucket(n_tokens: np.ndarray) -> np.ndarray:
    """Power-of-two buckets by actual length: '<=512', '<=1024', ..."""
    return np.array([f"<={2 ** math.ceil(math.log2(max(n, 2)))}" for n in n_tokens])


def breakdowns(arrays: LabelArrays, chosen: np.ndarray, times: TimeTable | None = None) -> dict:
    out = {}
    for name, keys in (("per_task", arrays.tasks), ("per_length", length_bucket(arrays.n_tokens))):
        out[name] = {str(k): policy_metrics(arrays.subset(keys == k), chosen[keys == k], times)
                     for k in sorted(set(keys), key=lambda s: (len(s), s))}
    return out


def decisions(policy: Policy | None, cal: Calibration | None, arrays: LabelArrays) -> np.ndarray:
    """Chosen level index per request; `policy=None` is the oracle."""
    if policy is None:
        return oracle_decisions(arrays)
    return cal.decide(policy.scores(arrays.features), arrays.n_tokens)


def evaluate_all(policies: list[Policy], cals: dict[str, Calibration], arrays: LabelArrays,
                 times: TimeTable | None = None) -> dict:
    """{policy name: metrics + calibration + breakdowns}, the oracle last."""
    out = {}
    for policy in [*policies, None]:
        name = "oracle" if policy is None else policy.name
        chosen = decisions(policy, cals.get(name), arrays)
        m = policy_metrics(arrays, chosen, times)
        m["calibration"] = cals[name].to_json() if name in cals else None
        out[name] = {**m, **breakdowns(arrays, chosen, times)}
    return out


def alpha_sweep(policies: list[Policy], cal: LabelArrays, test: LabelArrays, alphas, delta: float,
                edges=(), mode: str = "ltt") -> list[dict]:
    rows = []
    for alpha in sorted(set(alphas)):
        for policy in policies:
            c = calibrate(policy, cal, alpha, delta, edges, mode)
            m = policy_metrics(test, c.decide(policy.scores(test.features), test.n_tokens))
            rows.append({"policy": policy.name, "alpha": alpha, "passed": c.passed,
                         "violation_rate": m["violation_rate"], "compute_saved": m["compute_saved"]})
    return rows


def reliability(policy: LearnedPolicy, arrays: LabelArrays, bins: int = 10) -> list[dict]:
    """Predicted P(safe) vs observed safe frequency over every (request, sparse level)."""
    p = policy.scores(arrays.features)[:, 1:].ravel()
    closed = (arrays.label_index[:, None] >= np.arange(1, len(arrays.levels))[None]).ravel()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    return [{"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "n": int((which == b).sum()),
             "mean_predicted": float(p[which == b].mean()), "observed_safe": float(closed[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def best_in_hindsight(policy: Policy, arrays: LabelArrays, alpha: float) -> float:
    """The most compute a policy's scores could save at violation rate <= alpha if the threshold
    were tuned on these very requests: a ceiling for diagnosis, not a policy (no guarantee)."""
    scores, best = policy.per_request().scores(arrays.features), 0.0
    for lam in policy.lambdas:
        m = policy_metrics(arrays, decide(scores, lam))
        if m["violation_rate"] <= alpha:
            best = max(best, m["compute_saved"])
    return best


def separability(policy: LearnedPolicy, arrays: LabelArrays) -> dict[str, float | None]:
    """ROC AUC of P(safe at level) for 'label >= level', per sparse level."""
    from sklearn.metrics import roc_auc_score
    p = policy.scores(arrays.features)
    out = {}
    for k, level in enumerate(arrays.levels[1:], start=1):
        y = arrays.label_index >= k
        out[f"{level:g}"] = float(roc_auc_score(y, p[:, k])) if 0 < y.sum() < len(y) else None
    return out
