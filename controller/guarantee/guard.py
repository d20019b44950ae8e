"""The shift guard: requests unlike the calibration requests run at a safe fallback level.

A calibrated threshold is certified only for traffic exchangeable with its calibration requests.
`ShiftGuard` keeps a compact description of those requests (their token-length range and up to
`MAX_REFERENCE` of their feature vectors, standardised with the controller's own normalisation) and
flags a request when
- its length lies outside the calibrated range, or
- its conformal p-value is below `p_min`: per group of features (the surface and attention
  statistics; the mass-recall probes), the score is the distance to its k-th nearest calibration
  request in standardised feature space and the p-value the share of calibration requests whose own
  leave-one-out score is at least as large; the request's p-value is the smallest over the groups
  times their number (Bonferroni), so an exchangeable request is flagged with probability at most
  about `p_min`. Grouping matters: measured on held-out task families, 16 correlated recall
  features pooled with the rest diluted the distances so that a family the net extrapolates badly
  on passed the guard.
Flagged requests run at `fallback` (default dense, which is always safe: the guard can only lower
the violation rate of the calibrated policy). `Guarded` wraps a policy with it. Imports `data`
and `controller` modules below it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from data.errors import UserError
from data.features import FEATURE_NAMES

from controller.guarantee.monitor import ShiftMonitor
from controller.runtime.policy import Policy, mask_task

LOG_LENGTH = FEATURE_NAMES.index("log_length")
MAX_REFERENCE = 1000


def as_unknown_task(features: np.ndarray) -> np.ndarray:
    """Copy of [B, F] features (float64) with the task one-hot set to `unknown` (`mask_task`)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    return mask_task(x, torch.ones(len(x), dtype=torch.bool)).numpy()


def feature_groups() -> list[list[int]]:
    """Column groups the guard tests separately: the mass-recall probes, and everything else."""
    recall = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("probe_recall")]
    rest = [i for i in range(len(FEATURE_NAMES)) if i not in recall]
    return [g for g in (rest, recall) if g]


def _kth_distances(queries: np.ndarray, reference: np.ndarray, k: int, leave_one_out: bool = False) -> np.ndarray:
    """[Q] distance from each query to its k-th nearest reference row (itself excluded if the
    queries are the reference, `leave_one_out`)."""
    d2 = (queries ** 2).sum(1)[:, None] + (reference ** 2).sum(1)[None] - 2.0 * queries @ reference.T
    d2 = np.maximum(d2, 0.0)
    if leave_one_out:
        np.fill_diagonal(d2, np.inf)
    k = min(k, d2.shape[1] - int(leave_one_out))
    return np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])


@dataclass(frozen=True)
class ShiftGuard:
    min_tokens: int
    max_tokens: int
    mean: np.ndarray          # [F] standardisation (the controller's feature normalisation)
    std: np.ndarray           # [F]
    reference: np.ndarray     # [m, F] standardised calibration features
    reference_scores: np.ndarray  # [G, m] leave-one-out k-th neighbour distances, per feature group
    groups: tuple[tuple[int, ...], ...]   # feature columns of each group
    k: int = 5
    p_min: float = 0.01
    fallback: float = 0.0     # the grid level flagged requests run at
    ignore_task: bool = False  # the deployed policy never reads the task name: compare requests as `unknown`
    warmup: int = 0           # the first requests of a stream run at `fallback` while the monitor watches

    @classmethod
    def fit(cls, features: np.ndarray, n_tokens: np.ndarray, mean: np.ndarray, std: np.ndarray, k: int = 5,
            p_min: float = 0.01, fallback: float = 0.0, seed: int = 0, ignore_task: bool = False,
            warmup: int = 0) -> "ShiftGuard":
        features = as_unknown_task(features) if ignore_task else np.asarray(features, dtype=np.float64)
        if len(features) < 2:
            raise UserError("the shift guard needs at least 2 calibration requests")
        if len(features) > MAX_REFERENCE:
            features = features[np.random.default_rng(seed).choice(len(features), MAX_REFERENCE, replace=False)]
        mean, std = np.asarray(mean, np.float64), np.maximum(np.asarray(std, np.float64), 1e-6)
        reference = (features - mean) / std
        groups = tuple(tuple(g) for g in feature_groups()) if reference.shape[1] == len(FEATURE_NAMES) \
            else (tuple(range(reference.shape[1])),)
        scores = np.stack([_kth_distances(reference[:, g], reference[:, g], k, leave_one_out=True) for g in groups])
        return cls(int(np.min(n_tokens)), int(np.max(n_tokens)), mean, std, reference, scores, groups, k, p_min, fallback,
                   ignore_task, int(warmup))

    def standardise(self, features: np.ndarray) -> np.ndarray:
        """Features as the guard compares them (task shown as `unknown` if it is ignored), standardised."""
        x = as_unknown_task(features) if self.ignore_task else np.asarray(features, dtype=np.float64)
        return (x - self.mean) / self.std

    def p_values(self, features: np.ndarray) -> np.ndarray:
        """[B] conformal p-value of each request's distances to the calibration requests (smallest
        over the feature groups, Bonferroni-corrected)."""
        x = self.standardise(features)
        m = self.reference_scores.shape[1]
        per_group = [(1.0 + (ref[None] >= _kth_distances(x[:, g], self.reference[:, g], self.k)[:, None]).sum(1)) / (m + 1.0)
                     for g, ref in zip(self.groups, self.reference_scores)]
        return np.minimum(1.0, len(self.groups) * np.min(per_group, axis=0))

    def reference_flagged_share(self) -> float:
        """Share of the calibration requests themselves whose leave-one-out p-value is below p_min
        (the in-distribution cost of the guard)."""
        m = self.reference_scores.shape[1]
        p = np.min([(ref[None] >= ref[:, None]).sum(1) / m for ref in self.reference_scores], axis=0)
        return float((np.minimum(1.0, len(self.groups) * p) < self.p_min).mean())

    def check(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(flagged [B] bool, p-values [B], reason per request or None). Lengths come from the
        features' log_length, so the guard works on stored features as well as in the hook."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        n = np.rint(np.exp(features[:, LOG_LENGTH])).astype(np.int64)
        p = self.p_values(features)
        reasons: list[str | None] = []
        for ni, pi in zip(n, p):
            if ni < self.min_tokens or ni > self.max_tokens:
                reasons.append(f"length {ni} tokens is outside the calibrated range {self.min_tokens}-{self.max_tokens}")
            elif pi < self.p_min:
                reasons.append(f"features off the calibrated support (conformal p = {pi:.4f} < {self.p_min:g})")
            else:
                reasons.append(None)
        return np.array([r is not None for r in reasons]), p, reasons

    def monitor(self, threshold: float = 100.0) -> ShiftMonitor:
        """A fresh stream monitor for this guard: the martingale over its p-values, and windows of raw
        request features tested against its calibration requests."""
        return ShiftMonitor(threshold, warmup=self.warmup,
                            window_test=lambda feats: two_sample_test(self.reference, self.standardise(feats))["p_value"])

    def describe(self) -> str:
        return (f"requests of {self.min_tokens}-{self.max_tokens} tokens whose features are within the calibration "
                f"requests' support (k = {self.k} nearest-neighbour conformal p-value >= {self.p_min:g}); others run "
                f"at level {self.fallback:g}" + (" (dense)" if self.fallback == 0 else ""))

    def to_json(self) -> dict:
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "k": self.k, "p_min": self.p_min,
                "ignore_task": self.ignore_task, "warmup": self.warmup,
                "fallback": self.fallback, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "reference": np.round(self.reference, 5).tolist(), "groups": [list(g) for g in self.groups],
                "reference_scores": np.round(self.reference_scores, 6).tolist()}

    @classmethod
    def from_json(cls, d: dict, n_features: int, levels: np.ndarray) -> "ShiftGuard":
        """Parse and validate a checkpoint's guard record (ValueError on anything wrong)."""
        ref = np.asarray(d["reference"], dtype=np.float64)
        scores = np.asarray(d["reference_scores"], dtype=np.float64)
        mean, std = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64)
        groups = tuple(tuple(int(i) for i in g) for g in d["groups"])
        if ref.ndim != 2 or ref.shape[1] != n_features or len(ref) < 2 or scores.shape != (len(groups), len(ref)) \
                or mean.shape != (n_features,) or std.shape != (n_features,) or not groups \
                or any(not g or min(g) < 0 or max(g) >= n_features for g in groups):
            raise ValueError("guard arrays have the wrong shapes")
        if not (np.isfinite(ref).all() and np.isfinite(scores).all() and np.isfinite(mean).all() and (std > 0).all()):
            raise ValueError("guard arrays hold non-finite values")
        k, p_min, fallback = int(d["k"]), float(d["p_min"]), float(d["fallback"])
        lo, hi, warmup = int(d["min_tokens"]), int(d["max_tokens"]), int(d.get("warmup", 0))
        if k < 1 or not 0 <= p_min < 1 or not 1 <= lo <= hi or not any(math.isclose(fallback, x) for x in levels) \
                or warmup < 0:
            raise ValueError("guard settings out of range (k >= 1, 0 <= p_min < 1, 1 <= min <= max tokens, "
                             "fallback a grid level, warmup >= 0)")
        return cls(lo, hi, mean, std, ref, scores, groups, k, p_min, fallback, bool(d.get("ignore_task", False)), warmup)


class Guarded(Policy):
    """A policy whose flagged requests decide the guard's fallback level at every threshold."""

    def __init__(self, base: Policy, guard: ShiftGuard, levels: np.ndarray, name: str | None = None):
        self.base, self.guard, self.name, self.lambdas = base, guard, name or base.name, base.lambdas
        self.levels = np.asarray(levels)
        self.fallback_index = int(np.argmin(np.abs(self.levels - guard.fallback)))

    def scores(self, features: np.ndarray) -> np.ndarray:
        scores = self.base.scores(features).copy()
        flagged = self.guard.check(features)[0]
        scores[flagged, :self.fallback_index + 1] = np.inf
        scores[flagged, self.fallback_index + 1:] = -np.inf
        return scores


def monitor_stream(guard: ShiftGuard, features: np.ndarray, threshold: float = 100.0, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The rows of `features` as one stream in a seeded random order through a fresh `ShiftMonitor`:
    ([n] bool, whether it had alarmed by each row's turn; the monitor's final state)."""
    order = np.random.default_rng(seed).permutation(len(features))
    monitor = guard.monitor(threshold)
    out = np.zeros(len(features), dtype=bool)
    x = np.asarray(features)[order]
    out[order] = monitor.run(guard.p_values(x), x)
    return out, monitor.to_json()


class Monitored(Guarded):
    """`Guarded` plus the stream monitor (`monitor.ShiftMonitor`), as the hook runs a checkpoint.
    Offline, the rows are taken as one stream in a seeded random order (a sorted table is not an
    exchangeable stream); from the request at which the monitor alarms, every request runs at the
    fallback level. `last_monitor` describes the last stream."""

    def __init__(self, base: Policy, guard: ShiftGuard, levels: np.ndarray, name: str | None = None,
                 threshold: float = 100.0, seed: int = 0):
        super().__init__(base, guard, levels, name)
        self.threshold, self.seed = threshold, seed
        self.last_monitor: dict | None = None
        self._memo: dict[str, tuple[np.ndarray, dict | None]] = {}

    def per_request(self) -> Guarded:
        """The guard alone: thresholds are certified for it. The monitor only sends requests dense
        (always safe) by their place in a stream, which a calibration set has no meaning for: run
        over the calibration requests, its warm-up would make them look safer than later traffic."""
        return Guarded(self.base, self.guard, self.levels, self.name)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Memoised per features array: evaluation asks for the same stream many times (every alpha
        of a sweep), and each pass runs the window tests."""
        x = np.ascontiguousarray(features)
        key = hashlib.sha1(x.tobytes() + str(x.shape).encode()).hexdigest()
        if key not in self._memo:
            self._memo[key] = (self._scores(x), self.last_monitor)
        scores, self.last_monitor = self._memo[key]
        return scores.copy()

    def _scores(self, features: np.ndarray) -> np.ndarray:
        scores = super().scores(features)
        alarmed, self.last_monitor = monitor_stream(self.guard, features, self.threshold, self.seed)
        scores[alarmed, :self.fallback_index + 1] = np.inf
        scores[alarmed, self.fallback_index + 1:] = -np.inf
        return scores


def two_sample_test(reference: np.ndarray, evaluated: np.ndarray, seed: int = 0) -> dict:
    """Classifier two-sample test: are `evaluated` requests' features exchangeable with the
    calibration `reference`? Half of each set (seeded) trains a gradient-boosted classifier to tell
    them apart; on the other half its scores are compared by a one-sided Mann-Whitney U test (valid:
    the held-out half is independent of the fit). Returns the held-out ROC AUC and the p-value
    (small = the sets differ)."""
    from scipy.stats import mannwhitneyu
    from sklearn.ensemble import HistGradientBoostingClassifier
    a, b = np.asarray(reference, np.float64), np.asarray(evaluated, np.float64)
    if len(a) < 8 or len(b) < 8:
        return {"auc": None, "p_value": None, "n_reference": len(a), "n_evaluated": len(b)}
    rng = np.random.default_rng(seed)
    ia, ib = rng.permutation(len(a)), rng.permutation(len(b))
    fit_a, test_a, fit_b, test_b = a[ia[: len(a) // 2]], a[ia[len(a) // 2:]], b[ib[: len(b) // 2]], b[ib[len(b) // 2:]]
    x = np.concatenate([fit_a, fit_b])
    y = np.concatenate([np.zeros(len(fit_a)), np.ones(len(fit_b))])
    clf = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, random_state=seed,
                                         class_weight="balanced").fit(x, y)
    sa, sb = clf.predict_proba(test_a)[:, 1], clf.predict_proba(test_b)[:, 1]
    u = mannwhitneyu(sb, sa, alternative="greater")
    return {"auc": float(u.statistic / (len(sa) * len(sb))), "p_value": float(u.pvalue),
            "n_reference": len(a), "n_evaluated": len(b)}


def exchangeability_words(test: dict, flagged_share: float, level: float = 0.01) -> str:
    """The report's sentence on whether the guarantee's assumption looks plausible."""
    flag = f"The shift guard flagged {100 * flagged_share:.1f}% of the evaluated requests (they run at the fallback level)."
    if test.get("p_value") is None:
        return flag + " Too few requests for a two-sample test between calibration and evaluated features."
    stat = (f"a classifier two-sample test between the calibration requests' features and the evaluated ones gives "
            f"held-out AUC {test['auc']:.2f}, p = {test['p_value']:.2g}")
    if test["p_value"] < level:
        return (f"{flag} Traffic looks SHIFTED: {stat} (< {level:g}). The guarantee assumes exchangeable traffic and "
                f"does not cover these requests as a whole; recalibrate on them with calibrate.py --prompts.")
    return (f"{flag} No evidence of shift: {stat} (>= {level:g}); the guarantee's exchangeability assumption looks "
            f"plausible for this traffic (a test can only fail to find a shift, not prove there is none).")
