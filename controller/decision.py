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
