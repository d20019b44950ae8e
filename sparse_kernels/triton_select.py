"""Block selection on the GPU in Triton: pooling and a fused top-k that also writes the kernel's index.

Owns `pool_blocks_triton(x, block)` (mean of each sequence block in fp32, one launch) and
`topk_index_triton(scores, density, sink_start, sink_blocks, local_blocks, kmax, with_mask)`: one
program per (row, head, query block) computes how many blocks that query block keeps (the
`select.kept_block_counts` rule, in float64 like the torch version), masks non-causal blocks,
forces the sink and local blocks, maps scores to order-preserving integer keys and finds the
count-th largest by a 32-step bitwise search (no sort; ties go to the lower block id), then writes
the kept ids (ascending), the count and, if asked, the mask row. With the pooling and one matmul
for the scores it replaces the ~40 small launches of the torch path, whose cost at these sizes is
mostly the host launching them. The plain-torch functions in `select.py` are its reference (tests
compare them). Imports nothing from `data/` or `controller/`.
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
    def _pool_rows(X, OUT, sxb, sxh, sxn, sob, soh, son, H, N,
                   BLOCK: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
        """Mean over the rows of one sequence block of one (row, head), in fp32."""
        pid_bh = tl.program_id(0)
        blk = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, D)
        total = tl.zeros([D], tl.float32)
        for r in tl.static_range(0, BLOCK, ROWS):
            offs_n = blk * BLOCK + r + tl.arange(0, ROWS)
            x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :],
                        mask=offs_n[:, None] < N, other=0.0)
            total += tl.sum(x.to(tl.float32), 0)
        rows = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        tl.store(OUT + b * sob + h * soh + blk * son + offs_d, total / rows)

    @triton.jit
    def _topk_rows(S, DENSITY, SINK, COUNTS, IDX, MASK, ssb, ssh, ssq, scb, sch, sib, sih, siq,
                   smb, smh, smq, H, NK, SINK_BLOCKS, LOCAL_BLOCKS,
                   NK_POW2: tl.constexpr, WRITE_MASK: tl.constexpr):
        i = tl.program_id(0)                               # query block
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        j = tl.arange(0, NK_POW2)                          # key blocks
        s = tl.load(S + b.to(tl.int64) * ssb + h * ssh + i.to(tl.int64) * ssq + j, mask=j < NK,
                    other=float("-inf")).to(tl.float32)
        s = tl.where((s != s) | (s == float("-inf")), -3.4028234663852886e38, s)  # NaN, empty: lowest causal
        causal = j <= i
        sink = tl.load(SINK + b)
        forced = causal & ((j > i - LOCAL_BLOCKS) | ((j >= sink) & (j < sink + SINK_BLOCKS)))
        # select.kept_block_counts: clamp(ceil(density * (i + 1)), forced, i + 1), in float64
        want = tl.math.ceil(tl.load(DENSITY + b) * (i + 1).to(tl.float64) - 1e-9).to(tl.int32)
        count = tl.minimum(tl.maximum(want, tl.sum(forced.to(tl.int32), 0)), i + 1)
        s = tl.where(causal, s, float("-inf"))
        s = tl.where(forced, float("inf"), s)
        key = _order_key(s)
        thr = tl.zeros([], tl.int64)                       # the count-th largest key, bit by bit
        for t in tl.static_range(32):
            cand = thr | (1 << (31 - t))
            thr = tl.where(tl.sum((key >= cand).to(tl.int32), 0) >= count, cand, thr)
        above = key > thr
        tie = key == thr                                   # ties: the lower block ids first
        need = count - tl.sum(above.to(tl.int32), 0)
        keep = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1         # kept ids land in ascending order
        tl.store(IDX + b.to(tl.int64) * sib + h * sih + i.to(tl.int64) * siq + slot, j, mask=keep)
        tl.store(COUNTS + b * scb + h * sch + i, count)
        if WRITE_MASK:
            tl.store(MASK + b.to(tl.int64) * smb + h * smh + i.to(tl.int64) * smq + j, keep.to(tl.int8), mask=j < NK)


def pool_blocks_triton(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, nb, D] fp32: the mean of each block's rows (the last block may be short)."""
    b, h, n, d = x.shape
    nb = -(-n // block_size)
    out = torch.empty((b, h, nb, d), dtype=torch.float32, device=x.device)
    rows = min(block_size, max(16, 4096 // d))
    _pool_rows[(b * h, nb)](x, out, *x.stride()[:3], *out.stride()[:3], h, n,
                            BLOCK=block_size, D=d, ROWS=rows, num_warps=4)
    return out


def topk_index_triton(scores: torch.Tensor, density: torch.Tensor, sink_start: torch.Tensor, sink_blocks: int,
                      local_blocks: int, kmax: int, with_mask: bool = True):
    """scores [B, H, nq, nk] (any positive scale); density [B] -> (bool mask [B, H, nq, nk] or None,
    counts [B, H, nq] int32, indices [B, H, nq, kmax] int32: the first counts[b, h, i] entries of row
    i are its kept block ids, ascending; the rest are unused). kmax must bound every count."""
    b, h, nq, nk = scores.shape
    if nk > 65536:
        raise ValueError(f"fused top-k packs block ids in 16 bits; {nk} key blocks is too many")
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    counts = torch.empty((b, h, nq), dtype=torch.int32, device=scores.device)
    idx = torch.empty((b, h, nq, max(kmax, 1)), dtype=torch.int32, device=scores.device)
    mask = torch.empty((b, h, nq, nk), dtype=torch.int8, device=scores.device) if with_mask else idx
    density = density.to(device=scores.device, dtype=torch.float64)
    _topk_rows[(nq, b * h)](scores, density, sink_start.to(device=scores.device, dtype=torch.int32), counts, idx,
                            mask, *scores.stride()[:3], *counts.stride()[:2], *idx.stride()[:3],
                            *mask.stride()[:3], h, nk, sink_blocks, local_blocks,
                            NK_POW2=triton.next_power_of_2(nk), WRITE_MASK=with_mask,
                            num_warps=4 if nk <= 1024 else 8)
    return (mask.view(torch.bool) if with_mask else None), counts, idx


def fused_select(q, k, density, spec, scale: float, key_valid, sink, kmax: int, with_mask: bool):
    """The `fused` step of `select._select` (`density` [B] already on q's device): block means and
    scores (unscaled: a positive scale does not change the order) for block_topk, then one fused
    top-k writing counts, index and, if asked, the mask."""
    from .select import METHODS, group_scores
    if spec.method == "block_topk" and key_valid is None:
        scores = group_scores(pool_blocks_triton(q, spec.block_size), pool_blocks_triton(k, spec.block_size))
    else:
        scores = METHODS[spec.method](q, k, spec, scale, key_valid)
    return topk_index_triton(scores, density, sink, spec.sink_blocks, spec.local_blocks,
                             kmax, with_mask)
