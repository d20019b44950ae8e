"""Block selection: a sparsity level -> which KV blocks each query block computes.

Owns the one monotone knob (`kept_block_counts`), the block scorers (`block_topk`,
`vertical_slash`) and the achieved-sparsity accounting. The output is a boolean block mask
`[B, Hq, nq, nk]` (True = computed); every backend consumes that. Always kept: the causal
diagonal (`local_blocks` blocks ending at it) and the first `sink_blocks` valid key blocks.
Never kept: blocks above the diagonal.

Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

METHODS: dict[str, Callable[..., torch.Tensor]] = {}


def register_method(name: str):
    def wrap(fn):
        METHODS[name] = fn
        return fn
    return wrap


@dataclass(frozen=True)
class SelectionSpec:
    """How blocks are chosen. `method` names an entry of METHODS."""
    method: str = "block_topk"
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    last_queries: int = 64  # vertical_slash: how many final queries estimate the pattern

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise ValueError("sink_blocks must be >= 0 and local_blocks >= 1")


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def kept_block_counts(density: torch.Tensor, n_blocks: int, forced: torch.Tensor) -> torch.Tensor:
    """THE knob: blocks kept per query block for each row's density.

    density [B] in [0, 1]; forced [B, nq] = blocks that must be kept anyway. Returns [B, nq]
    int64 = clamp(ceil(density * (i + 1)), forced, i + 1). Non-decreasing in density; density 1
    keeps every causal block.
    """
    causal = torch.arange(1, n_blocks + 1, device=density.device, dtype=torch.float64)
    want = torch.ceil(density.double()[:, None] * causal[None, :] - 1e-9)
    counts = torch.maximum(want, forced.double())
    return torch.minimum(counts, causal[None, :]).long()


@functools.lru_cache(maxsize=64)
def _no_padding_sinks(batch: int, device: torch.device) -> torch.Tensor:
    """[B] int32 zeros on `device`, made once per (batch, device): read only, never written."""
    return torch.zeros(batch, dtype=torch.int32, device=device)


def first_valid_block(key_valid: torch.Tensor | None, batch: int, block_size: int, device) -> torch.Tensor:
    """[B] index of the block holding each row's first valid key (0 without padding: a cached
    tensor, so the sparse path launches nothing for it)."""
    if key_valid is None:
        return _no_padding_sinks(batch, torch.device(device))
    first = key_valid.long().argmax(dim=-1)
    return first // block_size


def forced_block_mask(n_blocks: int, spec: SelectionSpec, sink_start: torch.Tensor) -> torch.Tensor:
    """[B, nq, nk] True where a block is kept regardless of scores (sink + local, causal)."""
    idx = torch.arange(n_blocks, device=sink_start.device)
    qi, kj = idx[:, None], idx[None, :]
    local = (kj <= qi) & (kj > qi - spec.local_blocks)
    start = sink_start[:, None, None]
    sink = (kj[None] >= start) & (kj[None] < start + spec.sink_blocks) & (kj <= qi)[None]
    return local[None] | sink


def causal_block_mask(n_blocks: int, device) -> torch.Tensor:
    idx = torch.arange(n_blocks, device=device)
    return idx[None, :] <= idx[:, None]


def topk_block_index(scores: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor,
                     kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, head, query block), the `counts` best causal blocks, forced ones first.

    scores [B, H, nq, nk]; counts [B, nq]; forced [B, nq, nk]; kmax >= counts.max() if known
    (saves a host sync). Returns (bool mask [B, H, nq, nk], top [B, H, nq, kmax] block ids: the
    first counts[b, i] of row (b, h, i) are the kept ones, ascending as the Triton kernel's split
    loop reads them; the rest unused, distinct valid ids).
    """
    nq = scores.shape[-2]
    causal = causal_block_mask(nq, scores.device)
    # causal blocks without a score (all padding: -inf, or NaN) still rank above non-causal ones, so
    # every row keeps exactly `counts` causal blocks (the fused Triton top-k does the same)
    lowest = torch.finfo(torch.float32).min
    s = torch.nan_to_num(scores.float(), nan=lowest, neginf=lowest).masked_fill(~causal, float("-inf"))
    s = s.masked_fill(forced[:, None], float("inf"))
    kmax = max(int(counts.max()) if kmax is None else min(kmax, nq), 1)
    top = s.topk(kmax, dim=-1, sorted=True).indices  # best first; a full argsort cost 4x more on GPU
    keep = torch.arange(kmax, device=scores.device) < counts[:, None, :, None]
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, top, keep.expand_as(top))
    # kept ids ascending first, then the unused ones (still distinct, valid ids)
    ascending = (top + nq * (~keep)).sort(dim=-1).values % nq
    return mask & causal, ascending


def topk_block_mask(scores: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor,
                    kmax: int | None = None) -> torch.Tensor:
    """The bool mask of `topk_block_index`."""
    return topk_block_index(scores, counts, forced, kmax)[0]


def pool_blocks(x: torch.Tensor, block_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over each block of the sequence axis: [B, H, N, D] -> [B, H, nb, D], padding excluded."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    if valid is None:  # sum in float32 without materialising a float32 copy of x
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        means = xp.view(b, h, nb, block_size, d).sum(3, dtype=torch.float32) / block_size
        if pad:   # the last block holds fewer rows (an in-place scale: no tensor from the host, no sync)
            means[:, :, -1].mul_(block_size / (block_size - pad))
        return means
    w = valid.float()
    xf = torch.nn.functional.pad(x.float() * w[:, None, :, None], (0, 0, 0, pad))
    wf = torch.nn.functional.pad(w, (0, pad))
    sums = xf.view(b, h, nb, block_size, d).sum(3)
    cnt = wf.view(b, 1, nb, block_size).sum(-1).clamp_min(1.0)
    return sums / cnt[..., None]


def group_scores(q_rows: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, M, D] @ k [B, Hkv, K, D]^T without repeating K: -> [B, Hq, M, K]."""
    b, hq, m, d = q_rows.shape
    hkv = k_rows.shape[1]
    g = hq // hkv
    out = q_rows.view(b, hkv, g, m, d) @ k_rows[:, :, None].transpose(-1, -2)
    return out.view(b, hq, m, k_rows.shape[2])


@register_method("block_topk")
def block_topk_scores(q, k, spec: SelectionSpec, scale: float, key_valid=None, query_blocks=None) -> torch.Tensor:
    """Mean-pooled Q block . mean-pooled K block per head (The Sparse Frontier's Block-Sparse):
    [B, Hq, nq, nk], or only the rows of `query_blocks` [S] (the probes score a few blocks)."""
    qp = pool_blocks(q, spec.block_size, None)
    if query_blocks is not None:
        qp = qp[:, :, query_blocks]
    kp = pool_blocks(k, spec.block_size, key_valid)
    scores = group_scores(qp, kp) * scale
    if key_valid is not None:
        empty = pool_blocks(key_valid[:, None, :, None].float(), spec.block_size, None)[:, :, :, 0] == 0
        scores = scores.masked_fill(empty[:, :, None, :], float("-inf"))
    return scores


def last_query_attention(q, k, window: int, scale: float, key_valid=None):
    """Softmax attention of the last `window` queries over all causal, valid keys.

    Returns probs [B, Hq, w, N] (float32) and the query positions [w]."""
    n = q.shape[2]
    w = min(window, n)
    pos = torch.arange(n - w, n, device=q.device)
    return query_attention(q, k, pos, scale, key_valid), pos


def query_attention(q, k, pos: torch.Tensor, scale: float, key_valid=None) -> torch.Tensor:
    """[B, Hq, R, N] float32 softmax attention of the queries at positions `pos` [R] over their
    causal, valid keys."""
    return masked_softmax(group_scores(q[:, :, pos].float(), k.float()).mul_(scale), pos, key_valid)


def masked_softmax(logits: torch.Tensor, pos: torch.Tensor, key_valid=None) -> torch.Tensor:
    """Softmax of logits [B, H, R, N] of the queries at positions `pos` [R] over their causal, valid
    keys; a row with no such key gives zeros (only padding can do that: key 0 is causal to all)."""
    allowed = (torch.arange(logits.shape[-1], device=logits.device)[None, :] <= pos[:, None])[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
    return probs if key_valid is None else probs.nan_to_num_(0.0)


def sum_key_blocks(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., N] -> [..., nb]: sum over each key block."""
    n = probs.shape[-1]
    nb = num_blocks(n, block_size)
    padded = torch.nn.functional.pad(probs, (0, nb * block_size - n)) if n % block_size else probs
    return padded.view(*probs.shape[:-1], nb, block_size).sum(-1)


@register_method("vertical_slash")
def vertical_slash_scores(q, k, spec: SelectionSpec, scale: float, key_valid=None, query_blocks=None) -> torch.Tensor:
    """MInference-style: the last queries' attention mass per key block (vertical) plus per
    block diagonal (slash); score[i, j] = vertical[j] + slash[i - j]; rows i of `query_blocks` only
    when given."""
    b, hq, n, _ = q.shape
    bs = spec.block_size
    nb = num_blocks(n, bs)
    probs, pos = last_query_attention(q, k, spec.last_queries, scale, key_valid)
    probs = sum_key_blocks(probs, bs)  # [B, Hq, w, nk]
    vertical = probs.sum(2)
    ar = torch.arange(nb, device=q.device)
    offset = (pos // bs)[:, None] - ar[None, :]  # [w, nk]: query block - key block
    slash = torch.zeros(b, hq, nb, device=q.device)
    slash.scatter_add_(-1, offset.clamp_min(0).reshape(1, 1, -1).expand(b, hq, -1),
                       (probs * (offset >= 0)).reshape(b, hq, -1))
    rows = ar if query_blocks is None else query_blocks
    diag = (rows[:, None] - ar[None, :]).clamp_min(0).reshape(1, 1, -1).expand(b, hq, -1)
    return vertical[:, :, None, :] + slash.gather(-1, diag).view(b, hq, rows.shape[0], nb)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. From the CPU it goes through pinned memory without blocking: a plain copy
    would make the host wait for every kernel queued before it (a full sync per sparse layer)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def density_on(density: torch.Tensor, device: torch.device) -> torch.Tensor:
    """density [B] as float64 on `device` (`on_device`)."""
    return on_device(density.to(torch.float64), device)


def _select(q, k, density: torch.Tensor, spec: SelectionSpec, scale: float, key_valid, with_mask: bool = True,
            fused=None, placed: torch.Tensor | None = None):
    """(mask [B, Hq, nq, nk] or None, counts, index [B, Hq, nq, K]): counts [B, nq] from the torch
    top-k or [B, Hq, nq] from a fused one; both None when every row is dense. Only
    `select_blocks_with_index` converts them, so mask-only callers pay nothing for the index.
    `fused(q, k, density, spec, scale, key_valid, sink, kmax, with_mask)`, when given, replaces the
    torch scoring and top-k (`backends.selection` chooses it; this module stays plain torch).
    `placed`: `density` already on q's device (a caller running many layers places it once)."""
    b, hq, n, _ = q.shape
    nb = num_blocks(n, spec.block_size)
    if bool((density >= 1).all()):
        return causal_block_mask(nb, q.device).expand(b, hq, nb, nb).clone(), None, None
    sink = first_valid_block(key_valid, b, spec.block_size, q.device)
    # counts <= max(ceil(density * nb), sink + local): a bound known on the host when density is
    kmax = nb
    if density.device.type == "cpu":
        kmax = min(nb, max(math.ceil(float(density.max()) * nb), spec.sink_blocks + spec.local_blocks))
    placed = density_on(density, q.device) if placed is None else placed
    if fused is not None:
        return fused(q, k, placed, spec, scale, key_valid, sink, kmax, with_mask)
    forced = forced_block_mask(nb, spec, sink)
    counts = kept_block_counts(placed, nb, forced.sum(-1))
    scores = METHODS[spec.method](q, k, spec, scale, key_valid)
    mask, top = topk_block_index(scores, counts, forced, kmax)
    return mask, counts, top


def select_blocks(q, k, density: torch.Tensor, spec: SelectionSpec, scale: float,
                  key_valid: torch.Tensor | None = None, fused=None, placed=None) -> torch.Tensor:
    """q [B, Hq, N, D], k [B, Hkv, N, D], density [B] -> bool block mask [B, Hq, nq, nk]."""
    return _select(q, k, density, spec, scale, key_valid, fused=fused, placed=placed)[0]


def select_blocks_with_index(q, k, density: torch.Tensor, spec: SelectionSpec, scale: float,
                             key_valid: torch.Tensor | None = None, with_mask: bool = True, fused=None,
                             placed: torch.Tensor | None = None):
    """As `select_blocks`, plus the index the Triton kernel reads, straight from top-k (no sort of
    the mask): (mask [B, Hq, nq, nk], counts [B, Hq, nq] int32, indices [B, Hq, nq, K] int32).
    with_mask=False: the fused path skips writing the mask (None then; count blocks with
    `index_accounting`)."""
    mask, counts, index = _select(q, k, density, spec, scale, key_valid, with_mask, fused, placed)
    if counts is None:  # every row dense: query block i reads blocks 0..i
        b, hq, nb = mask.shape[:3]
        counts = torch.arange(1, nb + 1, device=mask.device, dtype=torch.int32).expand(b, hq, nb).contiguous()
        index = torch.arange(nb, device=mask.device, dtype=torch.int32).expand(b, hq, nb, nb).contiguous()
    elif counts.dim() == 2:  # torch top-k: one count per (row, query block), the same for every head
        b, hq, nb = mask.shape[:3]
        counts = counts.to(torch.int32)[:, None].expand(b, hq, nb).contiguous()
    return mask, counts, index.to(torch.int32).contiguous()


def index_accounting(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """As `block_accounting`, from the index's counts [B, Hq, nq]."""
    _, h, nq = counts.shape
    return counts.sum(dim=(1, 2)), h * nq * (nq + 1) // 2


def block_accounting(block_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Kept blocks per row [B] (summed over heads and query blocks) and causal blocks per row."""
    _, h, nq, _ = block_mask.shape
    return block_mask.sum(dim=(1, 2, 3)), h * nq * (nq + 1) // 2


def achieved_sparsity(block_mask: torch.Tensor) -> torch.Tensor:
    """[B] fraction of causal blocks NOT computed."""
    kept, causal = block_accounting(block_mask)
    return 1.0 - kept.double() / causal


def density_of_level(level: float) -> float:
    if not (0.0 <= level < 1.0) or math.isnan(level):
        raise ValueError(f"sparsity level must be in [0, 1), got {level}")
    return 1.0 - level
