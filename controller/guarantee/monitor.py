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
until `reset()` (a recalibrated checkpoint starts a new monitor).

The martingale sees only how far each request is from its nearest calibration requests. Traffic
that concentrates on one part of the calibration distribution (the held-out vt family: p-values
no smaller than uniform, yet a classifier tells it from the calibration requests at p = 7e-41) passes
it. So every `window` requests' features are also tested against the calibration requests with a
classifier two-sample test (`guard.two_sample_test`, given as `window_test`); the j-th window at
level `window_level` * 6 / (pi^2 j^2), so all windows together alarm falsely with probability at
most `window_level`. Both tests together: at most 1 / threshold + window_level (2% by default).

Neither test can alarm before it has seen requests, and the requests before an alarm run at the
controller's levels (measured: a held-out haystack kind on Gemma 3 made 3 unsafe decisions in its
first 16 requests, before the martingale alarmed at the 17th). With `warmup` N, the first N
requests of a stream (after `reset()` too) run at the fallback while both tests watch them
(`step` says which); only then do requests get the controller's levels.
Thread-safe. Imports numpy only.
"""
from __future__ import annotations

import math
import threading

import numpy as np

BETS = (0.0, -0.5, -1.0)


class ShiftMonitor:
    def __init__(self, threshold: float = 100.0, jump: float = 0.01, window: int = 100, window_level: float = 0.01,
                 window_test=None, warmup: int = 0):
        if not threshold > 1 or not 0 <= jump <= 1 or window < 8 or not 0 < window_level < 1 or warmup < 0:
            raise ValueError("ShiftMonitor needs threshold > 1, 0 <= jump <= 1, window >= 8, 0 < window_level < 1, "
                             "warmup >= 0")
        self.threshold, self.jump, self.window, self.window_level = threshold, jump, window, window_level
        self.warmup = int(warmup)   # the first `warmup` requests of a stream run at the fallback
        self.window_test = window_test   # features [window, F] -> p-value; None: the martingale only
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._capital = np.full(len(BETS), 1.0 / len(BETS))
            self.seen = 0
            self.alarm_at: int | None = None
            self.alarm_by = ""
            self.peak = 1.0
            self._buffer: list[np.ndarray] = []
            self.windows: list[float] = []   # each tested window's p-value

    @property
    def capital(self) -> float:
        return float(self._capital.sum())

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None

    def update(self, p_value: float) -> bool:
        """Bet on one request's p-value; True when the monitor is (now or already) alarmed."""
        return self.step(p_value)[0]

    def step(self, p_value: float) -> tuple[bool, int | None]:
        """`update`, and this request's place in the stream when it is one of the first `warmup`
        (it runs at the fallback: on probation), else None; both read under one lock."""
        p = min(max(float(p_value), 0.0), 1.0) if math.isfinite(p_value) else 1.0
        with self._lock:
            total = self._capital.sum()
            self._capital = (1 - self.jump) * self._capital + self.jump * total / len(BETS)
            self._capital *= 1.0 + np.asarray(BETS) * (p - 0.5)
            self.seen += 1
            self.peak = max(self.peak, float(self._capital.sum()))
            if self.alarm_at is None and self._capital.sum() >= self.threshold:
                self.alarm_at, self.alarm_by = self.seen, "martingale"
            return self.alarm_at is not None, (self.seen if self.seen <= self.warmup else None)

    def add_features(self, features: np.ndarray) -> np.ndarray | None:
        """Buffer one request's features; returns a full window to test (and starts a new one), else None."""
        if self.window_test is None:
            return None
        with self._lock:
            self._buffer.append(np.asarray(features, dtype=np.float64).ravel())
            if len(self._buffer) < self.window:
                return None
            full, self._buffer = np.stack(self._buffer), []
            return full

    def test_window(self, features: np.ndarray) -> bool:
        """Run the two-sample test on one window (the hook does this off the request path); True on alarm."""
        p = float(self.window_test(features))
        with self._lock:
            self.windows.append(p)
            j = len(self.windows)
            if self.alarm_at is None and p < self.window_level * 6 / (math.pi ** 2 * j ** 2):
                self.alarm_at, self.alarm_by = self.seen, f"two-sample test of window {j} (p = {p:.2g})"
            return self.alarm_at is not None

    def observe(self, p_value: float, features: np.ndarray | None = None) -> bool:
        """Both tests, synchronously (offline evaluation): True when this request runs at the
        fallback (alarmed, or on probation)."""
        alarmed, probation = self.step(p_value)
        full = self.add_features(features) if features is not None else None
        if full is not None:
            alarmed = self.test_window(full) or alarmed
        return alarmed or probation is not None

    def probation_reason(self, place: int) -> str:
        return (f"probation: request {place} of the first {self.warmup} of this stream runs at the fallback level "
                "while the stream monitor checks the traffic (calibration.guard_warmup)")

    def reason(self) -> str:
        what = ("the guard's p-values are not exchangeable with the calibration requests' (test martingale "
                f"reached {self.threshold:g})" if self.alarm_by == "martingale" else
                f"recent requests differ from the calibration requests ({self.alarm_by})")
        return (f"traffic shift detected after {self.alarm_at} requests: {what}; running at the fallback level "
                "until recalibrated on this traffic (calibrate.py) or reset")

    def run(self, p_values: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """[n] bool: each request of a stream, in order, runs at the fallback (alarmed by then, or on
        probation); for offline evaluation."""
        p_values = np.asarray(p_values, dtype=np.float64)
        return np.array([self.observe(p, None if features is None else features[i]) for i, p in enumerate(p_values)],
                        dtype=bool)

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "jump": self.jump, "warmup": self.warmup, "seen": self.seen,
                "alarm_at": self.alarm_at, "alarm_by": self.alarm_by, "capital": self.capital, "peak": self.peak, "window": self.window,
                "window_level": self.window_level, "window_p_values": list(self.windows)}
