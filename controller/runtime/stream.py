"""The stream part of the inference hook: what it knows of the traffic as a whole.

Owns `StreamState`: the shift monitor (`controller.guarantee.monitor.ShiftMonitor`, with its
window tests on a worker thread, off the request path), and, with the live certificate on
(`controller.runtime.shadow.certify_live`), the live risk bound, the shadow labeler and the
threshold ladder. With shadow labels a monitor alarm is a warning that raises the labeled share; the
fallback comes from harm (`live.harmful`). Imports `controller.guarantee`.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)


class StreamState:
    def __init__(self, guard):
        # the traffic as a whole: once its p-values stop looking exchangeable, every request runs at the fallback
        self.monitor = guard.monitor() if guard is not None else None
        # the live certificate (`certify_live`): shadow labels, fallback on harm
        self.live, self.shadow, self.ladder = None, None, None   # ladder: the threshold moving with live labels
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-monitor")

    @property
    def offset(self) -> float:
        """How far below the calibrated threshold the live ladder's certified rung decides (0: none)."""
        return self.ladder.offset if self.ladder is not None else 0.0

    def harm_reason(self) -> str | None:
        """Why every request runs dense now (the live violation rate's lower bound is above alpha), or None."""
        return self.live.reason() if self.live is not None and self.live.harmful else None

    def watch(self, features: np.ndarray, p_value: float) -> tuple[bool, int | None]:
        """One request's guard p-value and features into the monitor: (alarmed, probation place or
        None). With shadow labels an alarm only warns and labels more, so it comes back False."""
        alarmed, probation = self.monitor.step(p_value)
        window = self.monitor.add_features(features)
        if window is not None:   # the two-sample test runs on the worker thread, off the request path
            self.worker.submit(self.monitor.test_window, window)
        if alarmed and self.live is not None:   # with shadow labels a change is a warning: label more
            if not self.live.shift_warned:
                log.warning("%s; shadow-labeling %.0f%% of requests from now on", self.monitor.reason(),
                            100 * self.live.p_shift)
                self.live.warn_shift()
            alarmed = False
        return alarmed, probation

    def served_dense(self, rows: int) -> None:
        """Rows served dense before any decision: in the live rate, labels that cost nothing."""
        for _ in range(rows if self.shadow is not None else 0):
            self.shadow.offer(None, 0.0)

    def served(self, ids, level: float, rungs: list[float] | None) -> None:
        """A decided request, offered to the shadow labeler (sampled ones are labeled dense on its worker)."""
        self.shadow.offer(ids if isinstance(ids, np.ndarray) else None, level, rungs)

    def shutdown(self) -> None:
        if self.shadow is not None:
            self.shadow.shutdown()
        self.worker.shutdown(wait=False, cancel_futures=True)
