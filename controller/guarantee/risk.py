"""Anytime-valid bounds on the live violation rate of deployed decisions, from shadow labels.

Owns `BettingBounds` (a confidence sequence for the mean of a [0, 1] stream, by betting:
Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting", JRSS-B 2023) and
`LiveRisk` (the deployed certificate: a seeded share `p` of requests is labeled dense in the shadow,
their violations feed the bounds, and `harmful` turns true once the lower bound exceeds alpha) and
`ThresholdLadder` (the threshold moving with live labels: more aggressive only when certified,
more conservative at once).

For each candidate mean m on a grid, two capitals bet on the stream: K+(m) = prod(1 + l_i (x_i - m))
(wins when the mean is above m) and K-(m) = prod(1 - l_i (x_i - m)) (below), with predictable
plug-in bets l_i (from x_1..x_{i-1} only, truncated to keep every factor positive). Under a true
mean m each is a non-negative martingale, so by Ville's inequality it ever reaches 1/delta with
probability at most delta, over the whole stream, however long it runs and whenever it is read.
So `lower` (the grid point below the smallest m that K+ has not rejected) is a time-uniform lower
confidence bound at level 1 - delta, and `upper` likewise from K-. A monitor that falls back when `lower` > alpha falls back
falsely, on a stream whose rate stays at most alpha, with probability at most delta.

Labels are sampled uniformly among all requests (dense decisions are sampled too: their label is
known without a shadow run, a violation never), so the sampled stream's mean is the live violation
rate of the deployed decisions. Imports numpy only (ships at inference). Thread-safe.
"""
from __future__ import annotations

import hashlib
import math
import threading

import numpy as np

GRID = np.linspace(0.0005, 0.9995, 1000)   # candidate means
TRUNCATE = 0.5                                # bets at most half of what keeps a factor positive


class BettingBounds:
    """Time-uniform lower and upper confidence bounds on the mean of a [0, 1] stream."""

    def __init__(self, delta: float, grid: np.ndarray = GRID):
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.delta, self.grid = float(delta), np.asarray(grid, dtype=np.float64)
        self.log_up = np.zeros_like(self.grid)     # log K+(m)
        self.log_down = np.zeros_like(self.grid)   # log K-(m)
        self.n, self.total, self.sq = 0, 0.0, 0.25   # count, sum, running sum of squared errors (prior 1/4)
        self.lower, self.upper = 0.0, 1.0           # running intersection: never loosens

    def _bet(self) -> float:
        """Predictable plug-in bet (before seeing x_n+1): larger when the stream varies little."""
        t = self.n + 1
        var = self.sq / t
        return math.sqrt(2 * math.log(1 / self.delta) / (var * t * math.log(t + 1)))

    def update(self, x: float) -> None:
        x = min(max(float(x), 0.0), 1.0)
        lam = self._bet()
        up = np.minimum(lam, TRUNCATE / self.grid)
        down = np.minimum(lam, TRUNCATE / (1 - self.grid))
        self.log_up += np.log1p(up * (x - self.grid))
        self.log_down += np.log1p(-down * (x - self.grid))
        mean = (0.5 + self.total) / (self.n + 1)
        self.sq += (x - mean) ** 2
        self.n += 1
        self.total += x
        level = math.log(1 / self.delta)
        # the bounds are the grid points next to the first m not rejected from each side: the lower
        # one reaches the true mean only if the grid point at or above it was rejected (chance <= delta)
        kept_low = np.flatnonzero(self.log_up < level)
        kept_high = np.flatnonzero(self.log_down < level)
        low = 0.0 if not len(kept_low) or kept_low[0] == 0 else float(self.grid[kept_low[0] - 1])
        high = 1.0 if not len(kept_high) or kept_high[-1] == len(self.grid) - 1 else float(self.grid[kept_high[-1] + 1])
        self.lower, self.upper = max(self.lower, low), min(self.upper, high)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


class LiveRisk:
    """The certificate on live traffic: shadow-label a seeded share `p` of requests, bound their
    violation rate anytime-validly, and say `harmful` once the lower bound exceeds `alpha`."""

    def __init__(self, alpha: float, delta: float, p: float, seed: int = 0):
        if not 0 < alpha < 1 or not 0 < p <= 1:
            raise ValueError(f"LiveRisk needs 0 < alpha < 1 and 0 < p <= 1, got alpha={alpha}, p={p}")
        self.alpha, self.p, self.seed = float(alpha), float(p), int(seed)
        self.p_shift = self.p                # the share labeled once the shift monitor warned
        self.shift_warned = False
        self.bounds = BettingBounds(delta)
        self.harmful_at: int | None = None   # labels seen when the lower bound first exceeded alpha
        self.requests = 0                    # requests offered to `sampled`
        self._lock = threading.Lock()

    def sampled(self, key: str) -> bool:
        """Is this request shadow-labeled? Seeded by its key (a request id or its token ids), so a
        replay samples the same requests, and independent of its decision."""
        with self._lock:
            self.requests += 1
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.p * 2**64

    def observe(self, violated: bool) -> bool:
        """One sampled request's label (a dense decision: False); True when harmful (now or before)."""
        with self._lock:
            self.bounds.update(1.0 if violated else 0.0)
            if self.harmful_at is None and self.bounds.lower > self.alpha:
                self.harmful_at = self.bounds.n
            return self.harmful_at is not None

    def warn_shift(self) -> None:
        """The traffic changed (the shift monitor alarmed): label more, fall back only on harm."""
        with self._lock:
            self.p, self.shift_warned = max(self.p, self.p_shift), True

    @property
    def harmful(self) -> bool:
        return self.harmful_at is not None

    def reason(self) -> str:
        b = self.bounds
        return (f"live violation rate is above alpha {self.alpha}: its lower confidence bound is {b.lower:.3f} "
                f"after {b.n} shadow labels ({int(b.total)} violations; anytime-valid at delta {b.delta}); "
                "running dense until recalibrated")

    def state(self) -> dict:
        b = self.bounds
        return {"alpha": self.alpha, "delta": b.delta, "p": self.p, "shift_warned": self.shift_warned, "labels": b.n, "violations": int(b.total),
                "lower": b.lower, "upper": b.upper, "harmful_at": self.harmful_at, "requests": self.requests}


class ECusum:
    """An e-CUSUM change detector for "the rate rose above alpha" (Shin, Ramdas & Rinaldo, "E-detectors",
    2023): log M_t = max(log M_{t-1}, 0) + log(1 + bet (x_t - alpha)). Each factor has mean <= 1 while
    the rate is <= alpha, so the mean number of labels before a false alarm (log M reaching log arl)
    is at least `arl`."""

    def __init__(self, alpha: float, arl: float = 1000.0):
        self.alpha, self.arl, self.bet, self.log_m = float(alpha), float(arl), 0.25 / float(alpha), 0.0

    def update(self, x: float) -> bool:
        """One label (1: a violation); True when the detector alarms."""
        self.log_m = max(self.log_m, 0.0) + math.log1p(self.bet * (float(x) - self.alpha))
        return self.log_m >= math.log(self.arl)


class ThresholdLadder:
    """The threshold moving with live labels. Rungs are offsets below the calibrated score threshold:
    rung 0 (offset 0) is the offline certificate, later rungs are more aggressive. Every shadow-labeled
    request is judged at the level each rung would have chosen for it, and each rung k >= 1 keeps its
    own anytime-valid bounds at delta / (rungs - 1) (Bonferroni over the rungs live evidence can
    deploy). Rule:
    - more aggressive only when certified: rung k is deployed only while it and every rung before it
      have an upper bound below alpha;
    - more conservative at once: the deployed rung's labels since its deployment feed an e-CUSUM
      detector (Shin, Ramdas & Rinaldo, "E-detectors", 2023; bet `0.25 / alpha` against a rate <=
      alpha); when it reaches `arl` the rung is revoked for good and the ladder steps back to the
      last rung still certified. At a 40% rate that takes about 15 labels; under rates <= alpha the
      mean time to a false step back is >= `arl` labels (a step back costs savings, never safety).
    With probability >= 1 - delta every certified rung's rate is below alpha (the bounds are
    time-uniform), assuming the shadow-labeled requests are a random share of the traffic."""

    def __init__(self, offsets, alpha: float, delta: float, arl: float = 1000.0):
        offsets = [float(o) for o in offsets]
        if not offsets or offsets[0] != 0.0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"ladder offsets must start at 0 and increase, got {offsets}")
        self.offsets, self.alpha, self.delta = offsets, float(alpha), float(delta)
        share = delta / max(len(offsets) - 1, 1)
        self.bounds = [BettingBounds(share) for _ in offsets]
        self.arl = float(arl)
        self.detector = ECusum(self.alpha, self.arl)   # the deployed rung's, since its deployment
        self.revoked = [False] * len(offsets)
        self.deployed, self.moves = 0, []
        self._lock = threading.Lock()

    def levels(self, scores: np.ndarray, threshold: float) -> list[int]:
        """The level index each rung chooses for one request's scores (level 0 first, non-increasing)."""
        return [int((scores >= threshold - o).sum() - 1) for o in self.offsets]

    def observe(self, violations) -> int:
        """One shadow-labeled request judged at every rung's level; returns the rung deployed next."""
        with self._lock:
            for k, v in enumerate(violations):
                self.bounds[k].update(float(v))
            k = self.deployed
            if k > 0 and self.detector.update(float(violations[k])):   # harm at the deployed rung: back at once
                self.revoked[k] = True
            top = 0
            for j in range(1, len(self.offsets)):
                if self.revoked[j] or self.bounds[j].upper >= self.alpha:
                    break
                top = j
            if top != self.deployed:
                self.moves.append((self.bounds[0].n, self.deployed, top))
                self.deployed, self.detector = top, ECusum(self.alpha, self.arl)
            return self.deployed

    @property
    def offset(self) -> float:
        return self.offsets[self.deployed]

    def state(self) -> dict:
        return {"offsets": self.offsets, "deployed": self.deployed, "labels": self.bounds[0].n, "moves": self.moves,
                "revoked": self.revoked, "upper": [b.upper for b in self.bounds]}


def simulate_ladder(levels: np.ndarray, labels: np.ndarray, alpha: float, delta: float, p: float,
                    offsets, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Offline replay of the ladder: `levels` [n, rungs] the level index each rung chooses per request
    (in stream order), `labels` [n] the true label indices. A seeded share p is shadow-labeled; each
    request is served at the rung deployed when it arrives. Returns the served level indices and the
    ladder's state (`moved_at_request`: the request at which each move happened)."""
    rng = np.random.default_rng(seed)
    ladder = ThresholdLadder(offsets, alpha, delta)
    served = np.empty(len(labels), dtype=int)
    moved_at = []   # the request after which each move took effect
    for t in range(len(labels)):
        served[t] = levels[t, ladder.deployed]
        if rng.uniform() < p:
            ladder.observe(levels[t] > labels[t])
            if len(ladder.moves) > len(moved_at):
                moved_at.append(t)
    return served, {**ladder.state(), "moved_at_request": moved_at}


def simulate_live(chosen: np.ndarray, labels: np.ndarray, alpha: float, delta: float, p: float,
                  seed: int = 0, p_shift: float | None = None, shift_at: int | None = None) -> tuple[np.ndarray, dict]:
    """Offline replay of a stream behind the live certificate: requests in the given order decided at
    level indices `chosen`, with true label indices `labels` (a violation: chosen > label). Each is
    shadow-labeled with probability p (from request `shift_at` on, when the shift monitor warned,
    `p_shift`); from the request after the lower bound exceeds alpha, every request runs dense.
    Returns the level indices as served and the certificate's state (`harmful_at`: that request)."""
    rng = np.random.default_rng(seed)
    risk = LiveRisk(alpha, delta, p=1.0)   # sampling is done here, by the replay's own generator
    served = np.asarray(chosen).copy()
    labeled = 0
    for t in range(len(served)):
        if risk.harmful:
            served[t] = 0
            continue
        rate = p_shift if (p_shift is not None and shift_at is not None and t >= shift_at) else p
        if rng.uniform() < rate:
            labeled += 1
            if risk.observe(bool(served[t] > labels[t])):
                risk.harmful_at = t
    return served, {**risk.state(), "p": p, "p_shift": p_shift, "shift_at": shift_at, "shadow_labels": labeled}
