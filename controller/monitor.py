"""The stream monitor: is the traffic as a whole still exchangeable with the calibration requests?

The per-request guard (`guard.ShiftGuard`) flags a request whose features are far from every
calibration request. A shifted family can sit inside that support and still differ in
distribution: measured on held-out families of store v2, the guard flagged 0% of the vt requests
while a two-sample test rejected exchangeability at p = 7e-41, and the zero-shot violation rate was
7.4% at alpha 0.05. One request cannot show such a shift; a stream can.

`ShiftMonitor` bets against exchangeability with the guard's conformal p-values, which are
super-uniform under exchangeability (a conformal test martingale, Vovk et al., "Retrain or not
retrain", 2021): a jumper mixture of the betting functions f_e(p) = 1 + e (p - 1/2), e in
{0, -1/2, -1}, which win when p-values run small. Its capital is a non-negative supermartingale
under exchangeability, so by Ville's inequality it ever reaches `threshold` with probability at
most 1 / threshold (default 100: a false alarm on 1% of exchangeable streams, over the whole
stream). Once it has, every later request runs at the guard's fallback level (dense) and says why,
until `reset()` (a recalibrated checkpoint starts a new monitor). Thread-safe. Imports numpy only.
"""
from __future__ import annotations

import math
import threading

import numpy as np

BETS = (0.0, -0.5, -1.0)


class ShiftMonitor:
    def __init__(self, threshold: float = 100.0, jump: float = 0.01):
        if not threshold > 1 or not 0 <= jump <= 1:
            raise ValueError("ShiftMonitor needs threshold > 1 and 0 <= jump <= 1")
        self.threshold, self.jump = threshold, jump
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._capital = np.full(len(BETS), 1.0 / len(BETS))
            self.seen = 0
            self.alarm_at: int | None = None
            self.peak = 1.0

    @property
    def capital(self) -> float:
        return float(self._capital.sum())

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None

    def update(self, p_value: float) -> bool:
        """Bet on one request's p-value; True when the monitor is (now or already) alarmed."""
        p = min(max(float(p_value), 0.0), 1.0) if math.isfinite(p_value) else 1.0
        with self._lock:
            total = self._capital.sum()
            self._capital = (1 - self.jump) * self._capital + self.jump * total / len(BETS)
            self._capital *= 1.0 + np.asarray(BETS) * (p - 0.5)
            self.seen += 1
            self.peak = max(self.peak, float(self._capital.sum()))
            if self.alarm_at is None and self._capital.sum() >= self.threshold:
                self.alarm_at = self.seen
            return self.alarm_at is not None

    def reason(self) -> str:
        return (f"traffic shift: the guard's p-values of the last {self.alarm_at} requests are not exchangeable with "
                f"the calibration requests (test martingale reached {self.threshold:g}); running at the fallback "
                "level until recalibrated (calibrate.py) or reset")

    def run(self, p_values: np.ndarray) -> np.ndarray:
        """[n] bool: alarmed after each p-value of a stream, in order (for offline evaluation)."""
        return np.array([self.update(p) for p in np.asarray(p_values, dtype=np.float64)], dtype=bool)

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "jump": self.jump, "seen": self.seen, "alarm_at": self.alarm_at,
                "capital": self.capital, "peak": self.peak}
