"""Calls the benchmarks time, shared by `controller.benchmark` and `controller.experiments.bench_heldout`: a
level forced through a plan with no decision (`_forced_call`, optionally with the probes and the
fused probe), and a stream reset past its warm-up (`_past_warmup`). Imports `sparse_kernels`."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _fused_probe(on: bool):
    """The probe through the Triton kernel (`sparse_kernels.triton_probe`) or plain torch, whatever the default."""
    previous = os.environ.get("SPARSE_FUSED_PROBE")
    os.environ["SPARSE_FUSED_PROBE"] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SPARSE_FUSED_PROBE"]
        else:
            os.environ["SPARSE_FUSED_PROBE"] = previous


def _past_warmup(handle) -> None:
    """A fresh stream whose requests are all past the warm-up (no probation at the fallback level):
    the timed decision is the whole one, the controller's net included."""
    if handle.monitor is not None:
        handle.monitor.reset()
        handle.monitor.warmup = 0


def _forced_call(handle, call, level: float, graphs: bool, probes: bool, fused: bool):
    """`call` under a plan at `level` with the handle's sparse settings: no decision; `probes`: the
    probe statistics computed all the same (through the Triton probe when `fused`)."""
    from sparse_kernels import SparsePlan, use_plan

    def forced():
        plan = SparsePlan(levels=torch.full((1,), level, dtype=torch.float64), selection=handle.selection,
                          dense_layers=handle.dense_layers, backend=handle.backend, cuda_graphs=graphs,
                          probe_layers=handle.probe_layers if probes else frozenset(), probe_window=handle.probe_window,
                          on_probe=(lambda layer, stats: None) if probes else None)
        with _fused_probe(fused), use_plan(plan):
            return call()
    return forced
