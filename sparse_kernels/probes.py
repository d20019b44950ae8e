"""Attention probes: cheap statistics of the attention, taken in dense layers.

Owns `attention_probe`: for the last `window` queries of each row against all (causal, valid)
keys, per head, the normalized entropy and the share of attention mass held by the top
fraction of key blocks; then pooled over heads (mean and min/max). And `mass_recall`, the
mechanistic one: at `SAMPLED_BLOCKS` query blocks spread over the sequence (the last included),
the share of the true attention mass that the configured block selection keeps at each level
of `RECALL_LEVELS` (mean over heads, then mean and min over the sampled blocks). These are inputs
to the features in `data/features.py`. Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import functools
import math

import torch

from . import triton_probe
from .select import (METHODS, SelectionSpec, causal_block_mask, first_valid_block, forced_block_mask,
                     kept_block_counts, num_blocks, query_attention, sum_key_blocks)

TOP_FRACTIONS = (0.05, 0.1, 0.2)
RECALL_LEVELS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
SAMPLED_BLOCKS = 8
QUERIES_PER_BLOCK = 16   # queries of a sampled block whose attention is computed (spread, the last included)
PROBE_STATS = ("entropy_mean", "entropy_min",
               *(f"top{int(f * 100)}_mass_{p}" for f in TOP_FRACTIONS for p in ("mean", "min")),
               *(f"recall{round(lv * 100)}_{p}" for lv in RECALL_LEVELS for p in ("mean", "min")))


def _top_block_masses(blocks, fractions) -> list[torch.Tensor]:
    """Per fraction f, the attention mass of the top ceil(f * nk) key blocks of `blocks` [B, H, w, nk]
    (mass per key block): [B, H, w] each. One top-k at the largest fraction serves every fraction."""
    ks = [max(1, math.ceil(f * blocks.shape[-1])) for f in fractions]
    top = blocks.topk(max(ks), dim=-1).values   # sorted, largest first: top-k's values are its prefix
    return [top[..., :k].sum(-1) for k in ks]


def _visible_keys(pos: torch.Tensor, key_valid, batch: int) -> torch.Tensor:
    """[B, w] number of keys each probed query may attend to (at least 2, so log > 0)."""
    if key_valid is None:
        counts = (pos + 1).float()[None].expand(batch, -1)
    else:
        counts = key_valid.float().cumsum(-1)[:, pos]
    return counts.clamp_min(2.0)


def _sampled_block_ids(nq: int, count: int) -> list[int]:
    if nq <= 1:
        return [0]
    return torch.linspace(0, nq - 1, count + 1, dtype=torch.float64)[1:].ceil().long().unique().tolist()


def sampled_query_blocks(nq: int, count: int, device) -> torch.Tensor:
    """Up to `count` distinct query-block ids spread evenly over (0, nq - 1], the last included
    (block 0 sees only itself, so its recall is always 1)."""
    return torch.tensor(_sampled_block_ids(nq, count), dtype=torch.long, device=device)


def _positions_of(blocks: list[int], block_size: int, n: int, per_block: int) -> tuple[list[int], list[int]]:
    pos, owner = [], []
    for s, blk in enumerate(blocks):
        start, stop = blk * block_size, min((blk + 1) * block_size, n)
        take = torch.linspace(stop - 1, start, min(per_block, stop - start)).round().long().unique().tolist()
        pos += take
        owner += [s] * len(take)
    return pos, owner


def sampled_query_positions(blocks: torch.Tensor, block_size: int, n: int,
                            per_block: int = QUERIES_PER_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [R], owner [R]): up to `per_block` queries of each sampled block, spread evenly
    over the block's valid queries with its last one included, and the sampled block each belongs to."""
    pos, owner = _positions_of(blocks.tolist(), block_size, n, per_block)
    return (torch.tensor(pos, dtype=torch.long, device=blocks.device),
            torch.tensor(owner, dtype=torch.long, device=blocks.device))


def _to_device(values: list, dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting for queued kernels (pinned, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@functools.lru_cache(maxsize=32)
def _recall_densities(levels: tuple[float, ...], batch: int, device: torch.device) -> torch.Tensor:
    """[L * B] float64 densities 1 - level, each repeated per row, on `device` (once per shape)."""
    return _to_device([1.0 - lv for lv in levels for _ in range(batch)], torch.float64, device)


@functools.lru_cache(maxsize=32)
def _sample_plan(n: int, block_size: int, count: int, per_block: int, device: torch.device):
    """(blocks [S], positions [R], owner [R], queries per sampled block [S]) on `device`, built on
    the host from the shapes alone and cached per shape: the probe pays no host sync for them."""
    blocks = _sampled_block_ids(num_blocks(n, block_size), count)
    pos, owner = _positions_of(blocks, block_size, n, per_block)
    per = [max(owner.count(s), 1) for s in range(len(blocks))]
    return (_to_device(blocks, torch.long, device), _to_device(pos, torch.long, device),
            _to_device(owner, torch.long, device), _to_device(per, torch.float32, device))


@functools.lru_cache(maxsize=32)
def _probe_rows(n: int, window: int, block_size: int, count: int, per_block: int, device: torch.device):
    """(the last `window` query positions [w], those followed by the sampled queries of `_sample_plan`
    [w + R]) on `device`, once per shape: the probe attends from all of them in one pass."""
    last = torch.arange(n - min(window, n), n, device=device)
    return last, torch.cat([last, _sample_plan(n, block_size, count, per_block, device)[1]])


def probe_attention(q, k, pos: torch.Tensor, scale: float, key_valid, block_size: int, entropy_rows: int):
    """(attention mass per key block [B, Hq, R, nk], entropy in nats [B, Hq, entropy_rows] of the first
    `entropy_rows` queries) of the queries at positions `pos` [R] over their causal, valid keys. THE
    place that picks the path: the Triton kernel (`triton_probe`: unpadded rows, no logits held) or
    plain torch (a float32 [B, Hq, R, N] softmax)."""
    if key_valid is None and triton_probe.fused_probe_enabled(q.device, q.shape[-1]) and triton_probe.supports(q, block_size):
        mass, entropy = triton_probe.combine_block_stats(*triton_probe.probe_block_stats(q, k, pos, scale, block_size))
        return mass, entropy[:, :, :entropy_rows]
    probs = query_attention(q, k, pos, scale, key_valid)
    head = probs[:, :, :entropy_rows]
    return sum_key_blocks(probs, block_size), -(head * head.clamp_min(1e-30).log()).sum(-1)


def sampled_block_mass(q, k, plan, block_size: int, scale: float, key_valid=None, per_row=None) -> torch.Tensor:
    """[B, Hq, S, nk]: for each sampled query block of `plan` (`_sample_plan`), the attention mass its
    sampled queries put on each key block (softmax over causal, valid keys; mean over those queries).
    `per_row` [B, Hq, R, nk]: those queries' mass per key block, when the caller computed it already."""
    blocks, pos, owner, per = plan
    if per_row is None:
        per_row = probe_attention(q, k, pos, scale, key_valid, block_size, 0)[0]     # [B, Hq, R, nk]
    sums = torch.zeros(*per_row.shape[:2], blocks.shape[0], per_row.shape[-1], device=q.device)
    sums.index_add_(2, owner, per_row)
    return sums / per[None, None, :, None]


def _masks_and_counts(nq: int, spec: SelectionSpec, blocks: torch.Tensor, sink: torch.Tensor, levels: tuple):
    """At the sampled query blocks `blocks` [S], for rows whose first valid key block is `sink` [B]:
    (forced [B, S, nk], not causal [S, nk], kept blocks per level [L, B, S]) of the selection."""
    forced = forced_block_mask(nq, spec, sink)
    b = sink.shape[0]
    counts = kept_block_counts(_recall_densities(levels, b, sink.device), nq, forced.sum(-1).repeat(len(levels), 1))
    return forced[:, blocks], ~causal_block_mask(nq, sink.device)[blocks], counts.view(len(levels), b, nq)[:, :, blocks]


@functools.lru_cache(maxsize=32)
def _unpadded_masks_and_counts(n: int, spec: SelectionSpec, sampled: int, levels: tuple, device: torch.device):
    """`_masks_and_counts` for rows without padding (sink block 0 for all: one row, broadcast), made
    once per shape: a probe then launches nothing for them."""
    blocks = _sample_plan(n, spec.block_size, sampled, QUERIES_PER_BLOCK, device)[0]
    sink = first_valid_block(None, 1, spec.block_size, device)
    return _masks_and_counts(num_blocks(n, spec.block_size), spec, blocks, sink, levels)


def _ranked_blocks(q, k, blocks: torch.Tensor, forced: torch.Tensor, not_causal: torch.Tensor, spec: SelectionSpec,
                   scale: float, key_valid):
    """Key blocks of each sampled query block in the order the selection takes them (forced first,
    then by score, non-causal last): [B, Hq, S, nk]."""
    scores = METHODS[spec.method](q, k, spec, scale, key_valid, query_blocks=blocks).float()
    lowest = torch.finfo(torch.float32).min
    s = torch.nan_to_num(scores, nan=lowest, neginf=lowest)
    s = s.masked_fill(not_causal, float("-inf"))
    s = s.masked_fill(forced[:, None], float("inf"))
    return s.argsort(dim=-1, descending=True, stable=True)


@torch.no_grad()
def mass_recall(q: torch.Tensor, k: torch.Tensor, scale: float, spec: SelectionSpec, key_valid=None,
                levels=RECALL_LEVELS, sampled: int = SAMPLED_BLOCKS, block_mass=None) -> dict[str, torch.Tensor]:
    """{recall{level}_mean, recall{level}_min: [B]}: the share of the true attention mass at the
    sampled query blocks that `spec`'s selection keeps at each level (head mean; mean / min over
    the sampled blocks). The blocks are scored and ranked once; a level keeps the first
    `kept_block_counts` of them, so every level costs one gather. `block_mass`: the sampled queries'
    mass per key block, if computed already (see `sampled_block_mass`)."""
    b, _, n, _ = q.shape
    levels = tuple(levels)
    plan = _sample_plan(n, spec.block_size, sampled, QUERIES_PER_BLOCK, q.device)
    blocks = plan[0]
    if key_valid is None:
        forced, not_causal, counts = _unpadded_masks_and_counts(n, spec, sampled, levels, q.device)
        counts = counts.expand(-1, b, -1)
    else:
        sink = first_valid_block(key_valid, b, spec.block_size, q.device)
        forced, not_causal, counts = _masks_and_counts(num_blocks(n, spec.block_size), spec, blocks, sink, levels)
    mass = sampled_block_mass(q, k, plan, spec.block_size, scale, key_valid, block_mass)   # [B, Hq, S, nk]
    order = _ranked_blocks(q, k, blocks, forced, not_causal, spec, scale, key_valid)
    covered = mass.gather(-1, order).cumsum(-1) / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    idx = (counts - 1).clamp_min(0)[:, :, None, :, None].expand(-1, -1, covered.shape[1], -1, 1)
    recall = covered.expand(len(levels), *covered.shape).gather(-1, idx)[..., 0].mean(2)   # [L, B, S]
    out = {}
    for level, mean, low in zip(levels, recall.mean(-1).unbind(0), recall.amin(-1).unbind(0)):   # [B] each
        out[f"recall{round(level * 100)}_mean"], out[f"recall{round(level * 100)}_min"] = mean, low
    return out


@torch.no_grad()
def attention_probe(q: torch.Tensor, k: torch.Tensor, scale: float, window: int = 64,
                    block_size: int = 64, key_valid: torch.Tensor | None = None,
                    selection: SelectionSpec | None = None) -> dict[str, torch.Tensor]:
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> {stat name: [B] float32} (names in PROBE_STATS);
    `selection` (default: block_topk at `block_size`) is the selection whose mass recall is measured.
    The last `window` queries and the sampled ones of the mass recall attend in one pass."""
    selection = selection or SelectionSpec(block_size=block_size)
    pos, rows = _probe_rows(q.shape[2], window, selection.block_size, SAMPLED_BLOCKS, QUERIES_PER_BLOCK, q.device)
    w = pos.shape[0]
    if block_size == selection.block_size:
        mass, ent = probe_attention(q, k, rows, scale, key_valid, block_size, w)
        last, sampled = mass[:, :, :w], mass[:, :, w:]
    else:
        last, ent = probe_attention(q, k, pos, scale, key_valid, block_size, w)
        sampled = probe_attention(q, k, rows[w:], scale, key_valid, selection.block_size, 0)[0]
    ent = ent / _visible_keys(pos, key_valid, q.shape[0])[:, None, :].log()   # [B, H, w]
    per_head = torch.stack([ent, *_top_block_masses(last, TOP_FRACTIONS)]).mean(-1)   # [1 + F, B, H]
    names = ["entropy", *(f"top{int(f * 100)}_mass" for f in TOP_FRACTIONS)]
    out = {}
    for name, mean, low in zip(names, per_head.mean(2).unbind(0), per_head.amin(2).unbind(0)):   # [B] each
        out[f"{name}_mean"], out[f"{name}_min"] = mean, low
    out.update(mass_recall(q, k, scale, selection, key_valid, block_mass=sampled))
    return out
