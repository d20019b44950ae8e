"""CUDA graphs for the Triton sparse step of prefills short enough that the host bounds a layer.

Owns `StepGraphs`: per plan and per shape, the first sparse layer copies its q, k, v into static
buffers, runs the step (block selection + attention) on them eagerly (Triton compiles and
autotunes there) and then captures the same step as a CUDA graph; every later layer of that
shape copies its q, k, v into the buffers and replays the graph. A layer then costs the host 3
copies and one replay instead of the step's ~15 launches and their Python (measured on one H200
with SmolLM2's shape at 16K: 0.5-0.75 ms of host time per eager sparse layer against ~0.3 ms of GPU
time, so the GPU waited for the host).

- Kept-block counts accumulate inside the graph (one float64 tensor per row, read once at the end).
- A graph reads the plan's densities from the device tensor it was captured with, so it belongs to
  that plan and those levels (`SparsePlan.set_levels` drops them).
- Any failure to capture runs that shape eagerly for the rest of the plan, with one warning.
- Only for CUDA, unpadded rows and fewer than `GRAPH_BELOW_TOKENS` tokens over the batch (rows x
  length): from there the GPU bounds the layer, and the input copies would only add GPU time and
  memory (a labeling batch of 9 levels x 8 prompts never takes this path).

Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

GRAPH_BELOW_TOKENS = 32768   # rows x length; H200, SmolLM2, level 0.9, one row: host 44 ms vs GPU 65 ms at 32K

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _Captured:
    """One shape's step as a CUDA graph over static q, k, v; `kept` [B] accumulates over replays."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        self.kept = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None

    def load(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for static, t in zip(self.inputs, (q, k, v)):
            static.copy_(t)

    def capture(self, step: Step) -> None:
        """Record the step on a side stream (recording runs nothing; the caller's stream waits)."""
        main = torch.cuda.current_stream(self.kept.device)
        side = torch.cuda.Stream(self.kept.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out, counts = step(*self.inputs)
                self.kept.add_(counts.reshape(counts.shape[0], -1).sum(-1, dtype=torch.float64))
            finally:
                self.graph.capture_end()
        main.wait_stream(side)

    def replay(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.load(q, k, v)
        self.graph.replay()
        return self.out


class StepGraphs:
    """The captured steps of one plan, by shape key (see the module docstring)."""

    def __init__(self):
        self._graphs: dict[tuple, _Captured | None] = {}   # None: capturing failed, run eagerly

    @staticmethod
    def applies(q: torch.Tensor, key_valid) -> bool:
        return q.is_cuda and key_valid is None and q.shape[0] * q.shape[2] < GRAPH_BELOW_TOKENS

    def run(self, key: tuple, step: Step, q, k, v, counts, causal: int) -> torch.Tensor:
        """The step's output for this layer; its kept blocks go to `counts` (a `BlockCounts`)."""
        if key in self._graphs and self._graphs[key] is not None:
            counts.add(None, causal, rows=q.shape[0])
            return self._graphs[key].replay(q, k, v)
        if key in self._graphs:   # capturing this shape failed before
            out, kept = step(q, k, v)
            counts.add(kept, causal)
            return out
        captured = _Captured(q, k, v)
        captured.load(q, k, v)
        out, kept = step(*captured.inputs)   # eager, on the static buffers: compiles and autotunes for them
        counts.add(kept, causal)
        try:
            captured.capture(step)
        except Exception as e:  # noqa: BLE001 - a shape that cannot be captured still runs, eagerly
            log.warning("CUDA graph capture of the sparse step failed (%s: %s); this shape runs eagerly",
                        type(e).__name__, e)
            self._graphs[key] = None
            return out
        counts.track(captured.kept)
        self._graphs[key] = captured
        return out
