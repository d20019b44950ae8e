"""Fused top-k block selection in Triton: scores -> kept-block mask + the attention kernel's index.

Owns `topk_block_index_triton(scores, counts, sink_start, sink_blocks, local_blocks)`, the fused
equivalent of `select.topk_block_index` plus the index conversion: one program per (row, head,
query block) masks non-causal blocks, forces the sink and local blocks, sorts the row once
(scores packed with their block id into int64 keys, ties to the lower id) and writes the first
`counts` ids (best first) and their mask bits. Replaces ~8 torch kernels over the [B, H, nq, nk]
score tensor and the host sync for the top-k width. The plain-torch version in `select.py` is its
reference (tests compare them). Not yet timed on a GPU: `select.py` uses it only when
SPARSE_FUSED_TOPK=1. Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import torch

from .triton_attention import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _order_key(s):
        """float32 -> int64 in [0, 2^32) with the same order. Sign-extended IEEE bits: negative floats
        have negative bits in reverse order (-1 - bits), non-negative ones go above (bits + 2^31);
        every constant fits int32."""
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(bits < 0, -1 - bits, bits + 2147483647 + 1)

    @triton.jit
    def _topk_rows(S, COUNTS, SINK, MASK, IDX, ssb, ssh, ssq, scb, smb, smh, smq, sib, sih, siq,
                   H, NK, SINK_BLOCKS, LOCAL_BLOCKS, NK_POW2: tl.constexpr):
        i = tl.program_id(0)                               # query block
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        j = tl.arange(0, NK_POW2)                          # key blocks
        s = tl.load(S + b * ssb + h * ssh + i * ssq + j, mask=j < NK, other=float("-inf")).to(tl.float32)
        s = tl.where(s != s, float("-inf"), s)             # NaN -> never preferred
        causal = j <= i
        sink = tl.load(SINK + b)
        forced = causal & ((j > i - LOCAL_BLOCKS) | ((j >= sink) & (j < sink + SINK_BLOCKS)))
        s = tl.where(causal, s, float("-inf"))
        s = tl.where(forced, float("inf"), s)
        packed = _order_key(s) * 65536 + (65535 - j)       # ties: the lower block id first
        best = tl.sort(packed, 0, descending=True)
        ids = (65535 - (best & 65535)).to(tl.int32)        # block ids, best first
        count = tl.load(COUNTS + b * scb + i)
        keep = j < count
        tl.store(IDX + b * sib + h * sih + i * siq + j, ids, mask=j < NK)
        tl.store(MASK + b * smb + h * smh + i * smq + ids, keep.to(tl.int8), mask=keep)


def topk_block_index_triton(scores: torch.Tensor, counts: torch.Tensor, sink_start: torch.Tensor,
                            sink_blocks: int, local_blocks: int):
    """scores [B, H, nq, nk]; counts [B, nq]; sink_start [B] -> (bool mask [B, H, nq, nk],
    counts [B, H, nq] int32, indices [B, H, nq, nk] int32: the kept ids first, best first)."""
    b, h, nq, nk = scores.shape
    if nk > 65536:
        raise ValueError(f"fused top-k packs block ids in 16 bits; {nk} key blocks is too many")
    scores = scores.float().contiguous()
    counts = counts.to(torch.int32).contiguous()
    mask = torch.zeros((b, h, nq, nk), dtype=torch.int8, device=scores.device)
    idx = torch.empty((b, h, nq, nk), dtype=torch.int32, device=scores.device)
    _topk_rows[(nq, b * h)](scores, counts, sink_start.to(torch.int32).contiguous(), mask, idx,
                            *scores.stride()[:3], counts.stride(0), *mask.stride()[:3], *idx.stride()[:3],
                            h, nk, sink_blocks, local_blocks, NK_POW2=triton.next_power_of_2(nk))
    return mask.bool(), counts[:, None].expand(b, h, nq).contiguous(), idx
