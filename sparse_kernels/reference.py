"""Reference block-sparse attention: plain torch, any device, the ground truth.

Owns `reference_attention` (a block mask expanded to a token mask, then SDPA in float32) and
`token_mask`. At density 1 the token mask equals the causal mask, so the result is exactly
dense SDPA with that mask. GQA goes through SDPA's `enable_gqa` (K/V are not repeated).
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mask(block_mask: torch.Tensor, block_size: int, seq_len: int,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, nq, nk] block mask -> [B, H, N, N] bool token mask (causal, padding applied)."""
    m = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    m = m[..., :seq_len, :seq_len]
    pos = torch.arange(seq_len, device=block_mask.device)
    m = m & (pos[None, :] <= pos[:, None])
    if attn_mask is not None:
        m = m & attn_mask[..., -seq_len:, -seq_len:].to(torch.bool)
    return m


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                        block_size: int, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, N, D], k/v [B, Hkv, N, D], block_mask [B, Hq, nq, nk] -> out [B, Hq, N, D].

    Computed in float32 and cast back to q's dtype. Rows with no allowed key give zeros.
    """
    n = q.shape[2]
    mask = token_mask(block_mask, block_size, n, attn_mask)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    empty = ~mask.any(dim=-1, keepdim=True)
    return out.masked_fill(empty, 0.0).to(q.dtype)
