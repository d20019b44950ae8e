"""The decision part of the inference hook: a request's level from its features.

Owns `Decider`: the checkpoint's deployed policy under its calibrated threshold (lowered by the live
ladder's certified rung), the shift guard's fallback, the stream's probation and alarms, the skips
before any probe (lengths outside the calibrated range; prompts shorter than the measured
break-even) and the veto of levels slower than dense at a length. Imports `controller.runtime` and
`controller.guarantee` statistics through the checkpoint.
"""
from __future__ import annotations

import numpy as np

from data.features import FEATURE_NAMES
from sparse_kernels.dispatch import BreakEven

from controller.runtime.checkpoint import ControllerCheckpoint
from controller.runtime.decision import Decision, one_thread_limiter
from controller.runtime.policy import deployed_policy, kept_mass


class Decider:
    def __init__(self, ckpt: ControllerCheckpoint, break_even: BreakEven | None):
        self.levels = ckpt.levels
        self.policy = deployed_policy(ckpt.net, ckpt.levels, ckpt.record)
        self.calibration = ckpt.calibration   # parsed once, not per request
        self.guard = ckpt.guard   # None: a checkpoint without one (every request is decided by the controller)
        self.break_even = break_even   # None: sparse wherever the controller decides (no speed table applies)
        # benchmarks: run this level, still probing and deciding (no length or break-even skip)
        self.force_level: float | None = None
        # False: probe and decide every fresh prefill (diagnostics, tests), without the skips before
        # the probes (length outside the calibrated range, shorter than any break-even)
        self.dispatch = True
        self.one_thread = one_thread_limiter()

    def decide(self, features, n_tokens=None, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """features [B, F] -> (level index [B], P(safe) at it [B], P(safe) at every level [B, levels]
        or None for a mass-coverage policy) from one pass of the net; `n_tokens` [B] picks each row's
        length stratum (default: from the `log_length` feature); `offset` lowers the threshold."""
        features = np.asarray(features, dtype=np.float32)
        if n_tokens is None:
            n_tokens = np.rint(np.exp(features[:, FEATURE_NAMES.index("log_length")].astype(np.float64))).astype(np.int64)
        p = self.policy.probabilities(features)
        if p is None:   # mass coverage: report the estimated kept mass
            mass = kept_mass(self.policy, features)
            idx = self.calibration.decide(self.policy.scores(features), n_tokens)
            return idx, np.minimum(mass[np.arange(len(mass)), idx], 1.0), None
        idx = self.calibration.decide(self.policy.scores_from(p, features), n_tokens, offset)
        return idx, p[np.arange(len(p)), idx], p

    def decide_row(self, r: int, feats: np.ndarray, n_tokens: int, stream, info: dict) -> float:
        """The level of one request: the calibrated decision, or the guard's fallback when the
        request is outside the calibrated support, or dense on live harm. Records it in `info`."""
        info[("features", r)] = feats
        harm = stream.harm_reason()
        if harm is not None:   # fallback on harm: measured, not guessed
            info[r] = (1.0, harm, False, None)
            return 0.0
        p = None
        if self.guard is not None:
            flagged, p, reasons = self.guard.check(feats[None])
            alarmed, probation = stream.watch(feats, float(p[0]))
            if flagged[0] or alarmed:
                info[r] = (1.0, reasons[0] or stream.monitor.reason(), True, float(p[0]))
                return self.guard.fallback
            if probation is not None:
                info[r] = (1.0, stream.monitor.probation_reason(probation), False, float(p[0]))
                return self.guard.fallback
        offset = stream.offset   # read once: the decision's and the record's
        idx, prob, p_all = self.decide(feats[None], np.array([n_tokens]), offset)
        info[r] = (float(prob[0]), None, False, None if p is None else float(p[0]))
        base = self.calibration.threshold_at(n_tokens)
        info[("detail", r)] = (None if p_all is None else tuple(float(x) for x in p_all[0]),
                               None if base is None else base - offset)   # the threshold that decided it
        info[("base", r)] = base
        return float(self.levels[idx[0]])

    def _outside_lengths(self, lengths: list[int]) -> bool:
        """Every row outside the guard's calibrated lengths, with a dense fallback. A guard that cannot
        say is not skipped on: the decision path meets the failure and reports it per row."""
        g = self.guard
        try:
            return g is not None and g.fallback == 0 and all(not g.min_tokens <= t <= g.max_tokens for t in lengths)
        except Exception:  # noqa: BLE001 - a broken guard is reported where the rows are decided
            return False

    def skip_reason(self, n: int, lengths: list[int]) -> tuple[list[str], bool] | None:
        """Why no row of this prefill needs probes or a decision (every row runs dense: with no plan,
        exactly as unhooked SDPA, or on the window-only plan where that was measured faster), as
        (reason per row, out of distribution), or None."""
        if self.force_level is not None or not self.dispatch:
            return None
        if self._outside_lengths(lengths):
            g = self.guard
            return [f"length {t} tokens is outside the calibrated range {g.min_tokens}-{g.max_tokens}; ran dense"
                    for t in lengths], True
        if self.break_even is not None and n < self.break_even.shortest():
            shortest = self.break_even.shortest()
            where = f"below {shortest} tokens" if np.isfinite(shortest) else "at every measured length"
            return [f"sparse prefill is slower than dense {where} here ({n} tokens; {self.break_even.source}); "
                    "ran dense without a decision"] * len(lengths), False
        return None

    def veto_slow_levels(self, levels: np.ndarray, info: dict, n: int) -> None:
        """Rows decided at a level whose sparse path is slower than dense at length `n` run dense
        (always safe) and say why; the controller's P(safe) stays in the decision."""
        if self.break_even is None:
            return
        for r, level in enumerate(levels):
            if level > 0 and not self.break_even.allows(float(level), n):
                prob, _, ood, p_value = info[r]
                info[r] = (prob, self.break_even.why_dense(float(level), n), ood, p_value)
                levels[r] = 0.0

    def rungs(self, d: Decision, base: float | None, features, ladder) -> list[float] | None:
        """The level each rung of the live ladder would choose for this decision: the scores the policy
        decided with, against the calibrated threshold `base` (None: no ladder, or a request the
        calibrated rule did not decide)."""
        if ladder is None or d.p_safe is None or base is None or d.fallback is not None:
            return None
        scores = self.policy.scores_from(np.asarray([d.p_safe]), np.asarray(features, np.float32)[None])[0]
        return [float(self.levels[i]) for i in ladder.levels(scores, base)]
