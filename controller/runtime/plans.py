"""The plan part of the inference hook: what each fresh prefill runs under.

Owns `PlanMaker`: the checkpoint's block selection, its dense and probe layers, the probe window and
the attention backend, and the two plans the hook makes from them: the probing plan (levels set
after the probe layers, by the decision) and the window-only plan (level 0 with no probe, for
models whose sliding-window layers are faster over their window only). Imports `sparse_kernels`.
"""
from __future__ import annotations

import torch

from sparse_kernels import SelectionSpec, SparsePlan


class PlanMaker:
    def __init__(self, sparse: dict):
        """`sparse`: the checkpoint record's `sparse` section."""
        self.selection = SelectionSpec(method=sparse["method"], block_size=sparse["block_size"],
                                       sink_blocks=sparse["sink_blocks"], local_blocks=sparse["local_blocks"],
                                       last_queries=sparse["last_queries"])
        self.dense_layers, self.probe_layers = frozenset(sparse["dense_layers"]), frozenset(sparse["probe_layers"])
        self.probe_window, self.backend = sparse["probe_window"], sparse["backend"]

    def probing(self, on_probe, before_sparse) -> SparsePlan:
        """A plan with no levels yet: the probe layers run dense and call `on_probe(layer, stats)`;
        `before_sparse()` sets the levels before the first sparse layer."""
        return SparsePlan(levels=None, selection=self.selection, dense_layers=self.dense_layers, backend=self.backend,
                          probe_layers=self.probe_layers, on_probe=on_probe, before_sparse=before_sparse,
                          probe_window=self.probe_window)

    def window_only(self, rows: int) -> SparsePlan:
        """Level 0 for `rows` rows with no probe: only the sliding-window layers change path (the
        same attention, over their window only)."""
        return SparsePlan(levels=torch.zeros(rows, dtype=torch.float64), selection=self.selection,
                          dense_layers=self.dense_layers, backend=self.backend)
