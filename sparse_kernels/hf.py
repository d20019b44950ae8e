"""The transformers attention adapter and the per-request plan it reads.

Owns: `SparsePlan` (levels per batch row, selection spec, dense layers, backend, probe
callback, block accounting), `use_plan` (a context manager that makes a plan current for the
forward passes inside it), and `enable_sparse_attention` / `disable_sparse_attention`, which
switch a model to the registered attention function `ATTENTION_NAME` and back.

The adapter knows nothing about controllers: whoever runs the model (the labeler, the inference
hook) sets a plan. Rules, per attention call:
- no current plan, decode (query length 1) or a prefill continuing a cache -> dense SDPA,
  exactly transformers' own `sdpa_attention_forward`;
- a sliding-window layer (transformers passes `sliding_window`) -> dense within its window, always
  (FlexAttention over the blocks the window reaches on CUDA without padding, else SDPA with the
  model's own window mask), counted as a dense layer over the blocks its window reaches;
- prefill of a layer in `dense_layers`, or every row at level 0 -> dense SDPA, with its blocks
  counted as host-side integers (no GPU work, no host sync: a request run dense pays nothing per layer);
- probe layers call `on_probe(layer_idx, stats)` first, from the layer's queries and keys before
  its attention runs; every layer below the last probe layer is dense (`probe_layers_problem`), so
  the statistics never depend on a level. The last probe layer may itself run sparse;
- the first sparse layer reached with no levels yet calls `before_sparse()` once (a deferred
  decision; after its probe when that layer is a probe layer);
- otherwise: select blocks per row at density 1 - level, run the backend, count the blocks; in a
  batch that mixes rows at level 0 with sparse rows, the level-0 rows run SDPA (only the others
  take the sparse path), so a row at level 0 is never computed by a sparse kernel.
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .backends import BACKENDS, resolve_backend, selection
from .probes import attention_probe
from . import triton_attention
from .flex import sliding_window_attention
from .graphs import StepGraphs
from .select import (SelectionSpec, block_accounting, density_on, num_blocks, on_device, select_blocks,
                     select_blocks_with_index)

ATTENTION_NAME = "sparse_prefill"
_CURRENT: contextvars.ContextVar["SparsePlan | None"] = contextvars.ContextVar("sparse_plan", default=None)


@dataclass
class BlockCounts:
    """Blocks computed vs causal blocks per batch row, summed over layers and heads. Layers that
    ran dense are counted as host-side integers (the same for every row): the dense path launches
    no GPU work for its accounting. Sparse calls hand in their kept counts as device tensors that
    are summed only when read (no launch per layer)."""
    pending: list = field(default_factory=list)   # per sparse call: [B] or [B, ...] kept blocks (on device)
    dense_sparse: int = 0                     # blocks of sparse layers that ran dense, per row
    dense_all: int = 0                        # blocks of every layer that ran dense, per row
    rows: int = 0
    causal_sparse: int = 0
    causal_all: int = 0

    def add(self, kept: torch.Tensor | None, causal: int, rows: int | None = None) -> None:
        """A sparse-path call: `kept` [B] blocks per row, or [B, H, nq] per (row, head, query block);
        it stays on its device, unreduced until read (no host sync, no launch). `kept` None: a
        replayed CUDA graph, whose kept blocks accumulate in a tensor handed to `track` once."""
        if kept is not None:
            self.pending.append(kept)
        rows = kept.shape[0] if kept is not None else rows
        self.rows, self.causal_sparse, self.causal_all = rows, self.causal_sparse + causal, self.causal_all + causal

    def track(self, accumulator: torch.Tensor) -> None:
        """A [B] tensor that later calls add their kept blocks to (on the GPU)."""
        self.pending.append(accumulator)

    def add_dense(self, rows: int, causal: int, sparse: bool) -> None:
        """A call that ran dense: every row computed all `causal` blocks."""
        self.rows, self.dense_all, self.causal_all = rows, self.dense_all + causal, self.causal_all + causal
        if sparse:
            self.dense_sparse, self.causal_sparse = self.dense_sparse + causal, self.causal_sparse + causal

    @property
    def rows_sparse(self) -> torch.Tensor | None:
        """[B] float64 blocks kept by the sparse-path calls so far (None before any)."""
        if not self.pending:
            return None
        return sum(t.reshape(t.shape[0], -1).sum(-1, dtype=torch.float64) for t in self.pending)

    @property
    def kept_all(self) -> torch.Tensor | None:
        """[B] blocks computed on every layer (None before any layer ran)."""
        if self.rows_sparse is None:
            return None if self.rows == 0 else torch.full((self.rows,), float(self.dense_all), dtype=torch.float64)
        return self.rows_sparse + self.dense_all

    @property
    def kept_sparse(self) -> torch.Tensor | None:
        """[B] blocks computed on sparse layers (None if no sparse layer ran)."""
        if self.rows_sparse is None:
            return None if self.causal_sparse == 0 else torch.full((self.rows,), float(self.dense_sparse), dtype=torch.float64)
        return self.rows_sparse + self.dense_sparse

    def achieved_sparsity(self) -> torch.Tensor:
        """[B] fraction of causal blocks not computed on sparse layers (0 if none ran sparse)."""
        if self.rows_sparse is None or self.causal_sparse == 0:
            return torch.zeros(self.rows, dtype=torch.float64)
        return (1.0 - self.kept_sparse / self.causal_sparse).cpu()


@dataclass
class SparsePlan:
    """What the adapter does for the forward passes run under `use_plan(plan)`.

    levels: [B] sparsity per batch row, or None for dense (a probe callback may set it).
    """
    levels: torch.Tensor | None
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    dense_layers: frozenset[int] = frozenset()
    backend: str = "auto"
    probe_layers: frozenset[int] = frozenset()
    on_probe: Callable[[int, dict[str, torch.Tensor]], None] | None = None
    probe_window: int = 64
    # called once, at the first sparse layer reached while levels is None, to set them (the hook decides
    # there: the GPU still has the layers queued after the last probe to run while the host decides)
    before_sparse: Callable[[], None] | None = None
    counts: BlockCounts = field(default_factory=BlockCounts)
    all_dense: bool = True   # every row at level 0 (kept by set_levels; the adapter reads it per layer)
    mixed: bool = False      # some rows at level 0 and some above: those run SDPA, the others sparse
    padding: tuple[int | None, bool] | None = None   # (mask length, whether keys are padded), read once
    cuda_graphs: bool = True   # replay the Triton sparse step as a CUDA graph where the host bounds it (graphs.py)
    _density: dict = field(default_factory=dict, repr=False)   # device -> (density [B] on the host, on device)
    _split: dict = field(default_factory=dict, repr=False)     # device -> `split`'s tuple
    _graphs: StepGraphs = field(default_factory=StepGraphs, repr=False)   # captured for these densities only

    def __post_init__(self):
        problem = probe_layers_problem(self.dense_layers, self.probe_layers)
        if problem is not None:
            raise ValueError(problem)
        if self.levels is not None:
            self.set_levels(self.levels)

    def set_levels(self, levels: torch.Tensor) -> None:
        levels = torch.as_tensor(levels, dtype=torch.float64).flatten()
        if levels.numel() and (levels.min() < 0 or levels.max() >= 1 or torch.isnan(levels).any()):
            raise ValueError(f"sparsity levels must be in [0, 1), got {levels.tolist()}")
        self.levels, self.all_dense = levels, bool((levels == 0).all())
        self.mixed = not self.all_dense and bool((levels == 0).any())
        self._density, self._split, self._graphs = {}, {}, StepGraphs()

    def density(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - levels on the host, the same on `device`), placed once per plan and device: the
        sparse layers then pay no host-to-device copy each."""
        if device not in self._density:
            density = 1.0 - self.levels
            self._density[device] = (density, density_on(density, device))
        return self._density[device]

    def split(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A mixed plan's (level-0 rows, other rows, their density on the host, on `device`), the
        row indices on `device`; placed once per plan and device."""
        if device not in self._split:
            dense, sparse = (self.levels == 0).nonzero().flatten(), (self.levels != 0).nonzero().flatten()
            density = 1.0 - self.levels[sparse]
            self._split[device] = (on_device(dense, device), on_device(sparse, device), density,
                                   density_on(density, device))
        return self._split[device]


def probe_layers_problem(dense_layers, probe_layers) -> str | None:
    """Why these probe layers cannot give level-independent statistics, or None. A probe reads its
    layer's queries and keys before the layer's attention runs, so only the layers below it must be
    dense: then the statistics are the same at every level, and the last probe layer itself may run
    sparse at the level its statistics decided (it then saves that layer's dense attention)."""
    if not probe_layers:
        return None
    below = set(range(max(probe_layers))) - set(dense_layers)
    if below:
        return (f"probe layers {sorted(probe_layers)} read layers {sorted(below)}, which are not dense "
                f"(dense layers {sorted(dense_layers)}): every layer below the last probe layer must be dense")
    return None


@contextlib.contextmanager
def use_plan(plan: SparsePlan):
    """Make `plan` current for every forward pass (prefill and decode) run inside the block."""
    token = _CURRENT.set(plan)
    try:
        yield plan
    finally:
        _CURRENT.reset(token)


def current_plan() -> SparsePlan | None:
    return _CURRENT.get()


def _key_valid(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, N] True for keys some query may attend to (False = padding); None without a mask."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    valid = attention_mask[:, 0].any(dim=-2)
    return None if bool(valid.all()) else valid


def _padded(plan: "SparsePlan", attention_mask: torch.Tensor | None) -> bool:
    """Whether this prefill masks padded keys, read once per plan and length (every layer's mask
    marks the same keys as padding; reading a sliding layer's full mask per layer would cost a pass
    over N x N and a host sync each time)."""
    n = None if attention_mask is None else attention_mask.shape[-1]
    if plan.padding is None or plan.padding[0] != n:
        plan.padding = (n, _key_valid(attention_mask) is not None)
    return plan.padding[1]


def _is_fresh_prefill(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[2] > 1 and query.shape[2] == key.shape[2]


def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, Hq, N, D], key/value [B, Hkv, N, D]."""
    plan = _CURRENT.get()
    if plan is None or not _is_fresh_prefill(query, key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layer = getattr(module, "layer_idx", None)
    if plan.on_probe is not None and layer in plan.probe_layers:   # before this layer's attention, at any level
        plan.on_probe(layer, attention_probe(query, key, scale, plan.probe_window, plan.selection.block_size,
                                             _key_valid(attention_mask), plan.selection))
    if plan.levels is None and plan.before_sparse is not None and layer not in plan.dense_layers:
        decide, plan.before_sparse = plan.before_sparse, None
        decide()
    levels, window = plan.levels, kwargs.get("sliding_window")
    if window is not None:
        # a sliding-window layer runs exactly as the model defines it and counts as a dense layer:
        # sparsity applies to global layers only. On CUDA without padding, FlexAttention visits only
        # the blocks the window reaches; otherwise SDPA under the model's own window mask.
        _count_dense(plan, query, sparse=False, window=int(window))
        if query.is_cuda and not _padded(plan, attention_mask):
            return sliding_window_attention(query, key, value, int(window), scale).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if layer in plan.dense_layers or levels is None or plan.all_dense:
        # the dense path: host-side accounting only, then exactly transformers' SDPA
        _count_dense(plan, query, sparse=layer not in plan.dense_layers)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if levels.shape[0] != query.shape[0]:
        raise ValueError(f"plan has {levels.shape[0]} levels for a batch of {query.shape[0]} rows")
    if plan.mixed:
        return _split_rows(plan, module, query, key, value, attention_mask, dropout, scaling, scale, **kwargs), None
    return _sparse_rows(plan, plan.counts, query, key, value, attention_mask, scale, *plan.density(query.device)), None


def _sparse_rows(plan: SparsePlan, counts, query, key, value, attention_mask, scale: float, density, placed,
                 graphs: bool = True) -> torch.Tensor:
    """Every row of `query` through the sparse path at its `density` (host [B], `placed` on the
    device); kept blocks go to `counts`. Returns [B, N, Hq, D]."""
    key_valid = _key_valid(attention_mask)
    backend = resolve_backend(plan.backend, query.device)
    if backend == "triton" and triton_attention.supports(query, plan.selection.block_size, key_valid):
        return _triton_step(plan, counts, query, key, value, density, placed, scale, key_valid, graphs)
    block_mask = select_blocks(query, key, density, plan.selection, scale, key_valid,
                               fused=selection(query.device), placed=placed)
    counts.add(*block_accounting(block_mask))
    out = BACKENDS[backend](query, key, value, block_mask, plan.selection.block_size, scale, attention_mask, key_valid)
    return out.transpose(1, 2).contiguous()


class _KeptRows:
    """Receives one sparse call's kept blocks (the `BlockCounts.add` interface, no graphs)."""
    kept, causal = None, 0

    def add(self, kept: torch.Tensor, causal: int, rows: int | None = None) -> None:
        self.kept, self.causal = kept, causal


def _split_rows(plan: SparsePlan, module, query, key, value, attention_mask, dropout, scaling, scale, **kwargs):
    """A batch with rows at level 0 and rows above. The level-0 rows run transformers' SDPA, as they
    would with every row dense (a request decided dense, or the labeler's dense reference row, is
    never computed by the sparse kernel); the others run the sparse path. Kept blocks are counted
    per row, every causal block for the dense ones. Returns [B, N, Hq, D]."""
    dense, sparse, density, placed = plan.split(query.device)

    def rows(t, idx):   # a mask broadcast over the batch (leading size 1) serves every subset as it is
        return t if t is None or t.shape[0] != query.shape[0] else t.index_select(0, idx)
    dense_out = sdpa_attention_forward(module, rows(query, dense), rows(key, dense), rows(value, dense),
                                       rows(attention_mask, dense), dropout, scaling, **kwargs)[0]
    kept = _KeptRows()
    sparse_out = _sparse_rows(plan, kept, rows(query, sparse), rows(key, sparse), rows(value, sparse),
                              rows(attention_mask, sparse), scale, density, placed, graphs=False)
    out = dense_out.new_empty((query.shape[0], *dense_out.shape[1:]))
    out.index_copy_(0, dense, dense_out)
    out.index_copy_(0, sparse, sparse_out)
    per_row = torch.full((query.shape[0],), float(kept.causal), dtype=torch.float64, device=query.device)
    per_row.index_copy_(0, sparse, kept.kept.reshape(sparse.shape[0], -1).sum(-1, dtype=torch.float64))
    plan.counts.add(per_row, kept.causal)
    return out


def _triton_step(plan: SparsePlan, counts, query, key, value, density, placed, scale: float, key_valid,
                 graphs: bool = True) -> torch.Tensor:
    """Selection writing the index the Triton kernel reads (no mask is built), then the kernel; as a
    replayed CUDA graph where `StepGraphs.applies` (and `graphs`). Kept blocks go to `counts`.
    Returns [B, N, Hq, D] (the kernel's own layout)."""
    spec, fused = plan.selection, selection(query.device)

    def step(q, k, v):
        _, counts, indices = select_blocks_with_index(q, k, density, spec, scale, key_valid, with_mask=False,
                                                      fused=fused, placed=placed)
        out = triton_attention.block_sparse_attention(q, k, v, counts, indices, spec.block_size, scale)[0]
        return out, counts

    nq = num_blocks(query.shape[2], spec.block_size)
    causal = query.shape[1] * nq * (nq + 1) // 2   # per row, over heads
    # Triton launches, graph capture and replay use the current device: make it the tensors' one
    # (a model spread over several GPUs leaves the current device at the first)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        if graphs and plan.cuda_graphs and StepGraphs.applies(query, key_valid):
            key_ = (tuple(query.shape), tuple(key.shape), query.dtype, query.device, scale)
            out = plan._graphs.run(key_, step, query, key, value, counts, causal)
        else:
            out, kept = step(query, key, value)
            counts.add(kept, causal)
    return out.transpose(1, 2).contiguous()


def _count_dense(plan: SparsePlan, query: torch.Tensor, sparse: bool, window: int | None = None) -> None:
    """Blocks a dense call computes: the causal ones, or within a sliding window only those it reaches."""
    b, h, n, _ = query.shape
    bs = plan.selection.block_size
    nq = -(-n // bs)
    if window is None or window >= n:
        blocks = nq * (nq + 1) // 2
    else:   # query block i reaches min(i + 1, reach) blocks: a triangle, then a band of width reach
        reach = min(-(-window // bs) + 1, nq)
        blocks = reach * (reach + 1) // 2 + (nq - reach) * reach
    plan.counts.add_dense(b, h * blocks, sparse)


def sliding_window_of(model) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none (a config with
    `layer_types` slides where it says so; one without slides everywhere when it names a window)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    return int(window) if layer_types is None or "sliding_attention" in layer_types else None


class UnsupportedModel(ValueError):
    """The model's attention has a feature the sparse paths do not implement."""


def unsupported_reason(model) -> str | None:
    """Why block-sparse attention cannot honour this model's attention, or None. (Sliding-window
    layers are honoured: they always run dense. Attention scaling is honoured by every backend.)"""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap is not None:
        return (f"{cfg.model_type} caps attention logits (attn_logit_softcapping={cap}), which the sparse backends "
                "do not implement; this model cannot run block-sparse attention")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        return (f"{cfg.model_type} has learned attention sinks, which the sparse backends do not implement; "
                "this model cannot run block-sparse attention")
    return None


def register() -> None:
    """Register the attention function and its mask function (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_sparse_attention(model) -> str:
    """Switch `model` to the adapter; returns the implementation to restore later. Raises
    UnsupportedModel for attention it cannot honour (`unsupported_reason`)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModel(reason)
    register()
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return previous


def disable_sparse_attention(model, previous: str = "sdpa") -> None:
    model.set_attn_implementation(previous)
