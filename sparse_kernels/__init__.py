"""Block-sparse attention: selection, backends, probes and the transformers adapter.

The lowest layer of the framework: it must not import `data`, `controller` or the command lines.
"""
from .backends import BACKEND_CHOICES, BACKENDS, resolve_backend
from .hf import (ATTENTION_NAME, BlockCounts, SparsePlan, UnsupportedModel, current_plan, disable_sparse_attention,
                 enable_sparse_attention, probe_layers_problem, register, sliding_window_of, unsupported_reason,
                 use_plan)
from .probes import PROBE_STATS, attention_probe
from .reference import reference_attention
from .select import (METHODS, SelectionSpec, achieved_sparsity, block_accounting, kept_block_counts,
                     select_blocks)

__all__ = [
    "ATTENTION_NAME", "BACKENDS", "BACKEND_CHOICES", "BlockCounts", "METHODS", "PROBE_STATS",
    "SelectionSpec", "SparsePlan", "UnsupportedModel", "unsupported_reason", "achieved_sparsity", "attention_probe", "block_accounting",
    "current_plan", "disable_sparse_attention", "enable_sparse_attention", "kept_block_counts", "probe_layers_problem",
    "reference_attention", "register", "resolve_backend", "select_blocks", "sliding_window_of", "use_plan",
]
