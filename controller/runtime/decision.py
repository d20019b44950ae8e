"""What the inference hook decided for one request (`Decision`), and the one-thread limit its
decision math runs under (`one_thread_limiter`). Shipped at inference: standard library only
(threadpoolctl when installed); nothing from training.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    level: float                 # nominal grid level chosen for the request
    probability: float           # the controller's P(safe) at that level (1 for dense); for a checkpoint
                                 # deploying mass coverage, the estimated share of attention mass kept
    achieved_sparsity: float     # measured from the block index of the sparse layers
    fallback: str | None = None  # why the request ran at the fallback level instead of the controller's, if it did
    ood: bool = False            # the shift guard flagged it: outside the calibrated length range or feature support
    p_value: float | None = None  # the guard's conformal p-value of its features (None without a guard)
    p_safe: tuple[float, ...] | None = None  # the net's P(safe) at every grid level, dense first (None: not run)
    threshold: float | None = None  # the calibrated threshold that decided it (None: not run, or none passed)

    @property
    def reason(self) -> str:
        """Why this level, in one sentence: the fallback's reason, or the calibrated rule's."""
        if self.fallback is not None:
            return self.fallback
        if self.p_safe is None:
            return f"level {self.level:g}"
        per_level = ", ".join(f"{p:.2f}" for p in self.p_safe)
        if self.threshold is None:
            return f"dense: no threshold passed calibration for this length (P(safe) per level: {per_level})"
        rule = f"the calibrated rule (score threshold {self.threshold:.4g}; P(safe) per level: {per_level})"
        if self.level <= 0:
            return f"dense: no sparse level passes {rule}"
        return f"level {self.level:g}: the most aggressive level that passes {rule}"


def one_thread_limiter():
    """A context manager factory that runs the decision's numpy/torch math on one thread. The
    decision is tiny; left alone, the BLAS and OpenMP pools wake every core and keep spinning after
    it, starving the thread that launches the rest of the forward's kernels (measured on the H200
    machine: the hooked sparse prefill ran 20-30 ms slower than the same plan without the hook)."""
    try:
        from threadpoolctl import ThreadpoolController
        controller = ThreadpoolController()
    except Exception:  # noqa: BLE001 - without threadpoolctl the decision runs as it is
        return contextlib.nullcontext
    return lambda: controller.limit(limits=1)
