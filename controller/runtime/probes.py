"""The probe part of the inference hook: one fresh prefill in flight, and its rows' features.

Owns `Prefill` (the plan, its context, the probe statistics being gathered, the rows' token ids,
what was decided per row, and the token-id statistics computed on a worker thread while the probe
layers run) and `Probes` (that worker, the probe layers' call-back, and each row's feature vector
from both, through `data.features.compute_features`: THE extractor labeling used). Imports `data`.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from data.features import ProbeCollector, compute_features, feature_vector, text_statistics


@dataclass
class Prefill:
    """A fresh prefill on one thread, from the forward pre-hook to the forward hook."""
    ctx: object                    # the entered `use_plan` context
    plan: object                   # its `SparsePlan`
    collector: ProbeCollector      # the probe layers' statistics
    rows: list                     # per row: its token ids (numpy, padding removed)
    info: dict                     # per row r: (P(safe), fallback, ood, p-value); ("features" | "detail" | "base", r)
    text: list = field(default_factory=list)   # per row: a future of its token-id statistics
    tokens: int = 0                # the padded prompt length (the break-even tables' length)


class Probes:
    def __init__(self, plans):
        self.plans = plans   # the `PlanMaker`: its probe layers say which probe is the last
        # the token-id statistics need only the ids: a worker computes them while the probe layers run
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-features")

    def start(self, rows: list[np.ndarray]) -> list[Future]:
        return [self.worker.submit(text_statistics, ids) for ids in rows]

    def on_probe(self, collector: ProbeCollector, layer: int, stats: dict) -> None:
        """A probe layer's statistics; after the last one their copy to the host starts, so the GPU
        runs the layers queued before the first sparse one while the host decides."""
        collector(layer, stats)
        if layer == max(self.plans.probe_layers):
            collector.start_copy()

    def features(self, prefill: Prefill, r: int, task: str | None) -> np.ndarray:
        """Row `r`'s feature vector (FEATURE_NAMES order) from its probes and its token-id statistics."""
        ids = prefill.rows[r]
        return feature_vector(compute_features(ids, prefill.collector.pooled(r), task, text_stats=prefill.text[r].result()))

    def shutdown(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
