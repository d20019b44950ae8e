"""Attention probes: cheap statistics of the last queries' attention, taken in dense layers.

Owns `attention_probe`: for the last `window` queries of each row against all (causal, valid)
keys, per head, the normalized entropy and the share of attention mass held by the top
fraction of key blocks; then pooled over heads (mean and min/max). These are inputs to the
features in `data/features.py`. Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import math

import torch

from .select import last_query_attention, sum_key_blocks

TOP_FRACTIONS = (0.05, 0.1, 0.2)
PROBE_STATS = ("entropy_mean", "entropy_min",
               *(f"top{int(f * 100)}_mass_{p}" for f in TOP_FRACTIONS for p in ("mean", "min")))


def _top_block_mass(probs, block_size, fraction):
    blocks = sum_key_blocks(probs, block_size)
    k = max(1, math.ceil(fraction * blocks.shape[-1]))
    return blocks.topk(k, dim=-1).values.sum(-1)  # [B, H, w]


def _visible_keys(pos: torch.Tensor, key_valid, batch: int) -> torch.Tensor:
    """[B, w] number of keys each probed query may attend to (at least 2, so log > 0)."""
    if key_valid is None:
        counts = (pos + 1).float()[None].expand(batch, -1)
    else:
        counts = key_valid.float().cumsum(-1)[:, pos]
    return counts.clamp_min(2.0)


@torch.no_grad()
def attention_probe(q: torch.Tensor, k: torch.Tensor, scale: float, window: int = 64,
                    block_size: int = 64, key_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> {stat name: [B] float32} (names in PROBE_STATS)."""
    probs, pos = last_query_attention(q, k, window, scale, key_valid)
    n_visible = _visible_keys(pos, key_valid, q.shape[0])[:, None, :]  # [B, 1, w]
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / n_visible.log()  # [B, H, w]
    per_head = {"entropy": ent.mean(-1)}
    for f in TOP_FRACTIONS:
        per_head[f"top{int(f * 100)}_mass"] = _top_block_mass(probs, block_size, f).mean(-1)
    out = {"entropy_mean": per_head["entropy"].mean(1), "entropy_min": per_head["entropy"].amin(1)}
    for f in TOP_FRACTIONS:
        name = f"top{int(f * 100)}_mass"
        out[f"{name}_mean"] = per_head[name].mean(1)
        out[f"{name}_min"] = per_head[name].amin(1)
    return out
