"""Calibration with Learn-then-Test: pick the most aggressive threshold whose violation rate is
provably at most alpha with probability 1 - delta.

Owns `violations` (a request violates when it fails the safety criterion at the level actually
chosen for it), `Calibration` (the result) and `calibrate`. For each threshold of a policy, ordered
from conservative to aggressive, the null hypothesis "violation rate > alpha" gets a
Hoeffding-Bentkus p-value (binary loss) and MAPIE's fixed-sequence procedure controls the
family-wise error at delta; the last rejected threshold is chosen. If none is rejected the policy
falls back to dense for everyone and `passed` is False. With length strata (`edges`: token upper
bounds), each stratum gets its own threshold from its own calibration requests at delta / strata
(Bonferroni), so the bound holds in every stratum at once, not only over the calibrated mix of
lengths; a stratum that cannot be certified runs dense.
`mode="crc"` (conformal risk control, Angelopoulos et al., ICLR 2024) instead guarantees the
expected violation rate: with n exchangeable calibration requests and a loss that only grows as
the threshold gets more aggressive (a level above a request's label stays above it), the most
aggressive threshold in order whose (n * empirical risk + 1) / (n + 1) <= alpha, and every one
before it, gives E[violation rate on a new request] <= alpha. No delta: a statement about the
average over calibration draws, not one that holds with probability 1 - delta for this draw.
Imports `controller` modules below it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from controller.guarantee.arrays import LabelArrays
from controller.runtime.policy import Policy, decide


def violations(arrays: LabelArrays, chosen: np.ndarray) -> np.ndarray:
    """[n] bool: the request is unsafe at its chosen level index."""
    return ~arrays.safe[np.arange(len(arrays)), chosen]


@dataclass(frozen=True)
class Calibration:
    threshold: float          # +inf = always dense (stratified: the most conservative stratum's)
    passed: bool              # stratified: some stratum passed
    alpha: float
    delta: float
    n: int
    empirical_risk: float     # on the calibration split at the chosen threshold(s)
    tested: int               # thresholds rejected before the first failure (stratified: summed)
    edges: tuple[int, ...] = ()              # token upper bounds of every length stratum but the last; () = one
    parts: tuple["Calibration", ...] = ()    # one per stratum (len(edges) + 1) when edges
    mode: str = "ltt"                        # ltt: P(rate <= alpha) >= 1 - delta; crc: E[rate] <= alpha

    def threshold_at(self, n_tokens: int) -> float | None:
        """The threshold that decides a request of `n_tokens` (its stratum's); None where the
        calibration did not pass there (every such request runs dense)."""
        part = self.parts[int(strata_of(np.array([n_tokens]), self.edges)[0])] if self.parts else self
        return float(part.threshold) if part.passed and math.isfinite(part.threshold) else None

    def decide(self, scores: np.ndarray, n_tokens: np.ndarray | None = None, offset: float = 0.0) -> np.ndarray:
        """[n] level index per request; a stratified calibration needs each request's token count.
        `offset` lowers every passed threshold (a live ladder's certified rung, `controller.guarantee.risk`)."""
        if not self.parts:
            return decide(scores, self.threshold - offset) if self.passed else np.zeros(len(scores), dtype=int)
        if n_tokens is None:
            raise ValueError("a length-stratified calibration needs each request's token count")
        stratum = strata_of(n_tokens, self.edges)
        out = np.zeros(len(scores), dtype=int)
        for i, part in enumerate(self.parts):
            rows = stratum == i
            out[rows] = part.decide(scores[rows], offset=offset)
        return out

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("edges", "parts")}
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        if self.parts:
            d["edges"], d["parts"] = list(self.edges), [p.to_json() for p in self.parts]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        t = d["threshold"]
        parts = tuple(cls.from_json(p) for p in d.get("parts", ()))
        edges = tuple(int(e) for e in d.get("edges", ()))
        if len(parts) != (len(edges) + 1 if parts else 0) or list(edges) != sorted(set(edges)):
            raise ValueError("calibration: 'parts' must hold one calibration per length stratum (len(edges) + 1), "
                             "with 'edges' increasing")
        plain = {k: v for k, v in d.items() if k not in ("edges", "parts")}
        if plain.get("mode", "ltt") not in MODES:
            raise ValueError(f"calibration: mode must be one of {list(MODES)}, got {plain['mode']!r}")
        return cls(**{**plain, "threshold": math.inf if t is None else float(t)}, edges=edges, parts=parts)


def threshold_text(cal: dict, counts: bool = False) -> str:
    """A calibration's threshold(s) in words, from its JSON: '0.512', 'dense', or per length stratum
    ('<=8192: 0.512; >8192: dense'; with `counts`, each stratum's calibration requests)."""
    one = lambda c: "dense" if c["threshold"] is None or not c["passed"] else f"{c['threshold']:.4g}"  # noqa: E731
    if not cal.get("parts"):
        return one(cal)
    names = [f"<={e}" for e in cal["edges"]] + [f">{cal['edges'][-1]}"]
    return "; ".join(f"{n}: {one(c)}" + (f" ({c['n']} requests)" if counts else "") for n, c in zip(names, cal["parts"]))


def strata_of(n_tokens, edges) -> np.ndarray:
    """[n] stratum index per request: the first edge its token count does not exceed (len(edges) if none)."""
    return np.searchsorted(np.asarray(edges, dtype=np.int64), np.asarray(n_tokens, dtype=np.int64), side="left")


def ltt_p_values(risks: np.ndarray, n: int, alpha: float) -> np.ndarray:
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
    return compute_hoeffding_bentkus_p_value(np.asarray(risks, dtype=float), n, alpha, binary=True)[:, 0]


MODES = ("ltt", "crc")


def guarantee_text(mode: str, alpha: float, delta: float) -> str:
    """What a calibration promises, in words."""
    if mode == "crc":
        return f"expected violation rate <= {alpha} (conformal risk control)"
    return f"violation rate <= {alpha} with probability >= {1 - delta:g} (Learn-then-Test)"


def calibrate(policy: Policy, cal: LabelArrays, alpha: float, delta: float, edges=(), mode: str = "ltt") -> Calibration:
    """The calibration of `policy` on `cal`: one threshold, or one per length stratum when `edges`;
    `mode` ltt (high probability) or crc (expected rate)."""
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got {mode!r}")
    policy = policy.per_request()   # a stream monitor's warm-up and alarms are not calibrated on
    edges = tuple(int(e) for e in edges)
    if not edges:
        return _calibrate_one(policy, cal, alpha, delta, mode)
    stratum = strata_of(cal.n_tokens, edges)
    # crc: each stratum's expected rate <= alpha, so the mix's too; ltt: delta shared (Bonferroni)
    parts = tuple(_calibrate_one(policy, cal.subset(np.flatnonzero(stratum == i)), alpha, delta / (len(edges) + 1), mode)
                  for i in range(len(edges) + 1))
    c = Calibration(max(p.threshold for p in parts), any(p.passed for p in parts), alpha, delta, len(cal), 0.0,
                    sum(p.tested for p in parts), edges, parts, mode)
    risk = violations(cal, c.decide(policy.scores(cal.features), cal.n_tokens)).mean() if len(cal) else 0.0
    return dataclasses.replace(c, empirical_risk=float(risk))


def _calibrate_one(policy: Policy, cal: LabelArrays, alpha: float, delta: float, mode: str = "ltt") -> Calibration:
    from mapie.risk_control import control_fwer
    if len(cal) == 0:   # nothing to certify with: dense
        return Calibration(math.inf, False, alpha, delta, 0, 0.0, 0, mode=mode)
    scores = policy.scores(cal.features)
    risks = np.array([violations(cal, decide(scores, lam)).mean() for lam in policy.lambdas])
    if mode == "crc":
        n = len(cal)
        ok = (n * risks + 1) / (n + 1) <= alpha
        passed = int(np.argmin(ok)) if not ok.all() else len(ok)   # thresholds in order until the first failure
        rejected = np.arange(passed)
    else:
        rejected = control_fwer(ltt_p_values(risks, len(cal), alpha), delta, "fixed_sequence")
    if len(rejected) == 0:
        return Calibration(math.inf, False, alpha, delta, len(cal), 0.0, 0, mode=mode)
    last = int(np.max(rejected))
    return Calibration(float(policy.lambdas[last]), True, alpha, delta, len(cal), float(risks[last]), len(rejected),
                       mode=mode)
