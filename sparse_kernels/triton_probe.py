"""The probe's attention in Triton: the probed queries against every key, without the logits.

Owns `probe_block_stats(q, k, pos, scale, block_size)`: one program per (row, head, tile of
probed queries, run of `KEY_BLOCKS` key blocks) computes, block after block, the logits of those queries against that key block (causal:
key <= the query's position) and stores three numbers per query and key block: the block's
largest logit m, the sum of exp(logit - m) and the sum of exp(logit - m) * logit. And
`combine_block_stats`, which turns them into what the probe needs: the softmax mass of every key
block per query ([B, Hq, R, nk], what `select.sum_key_blocks` of the softmax gives) and each
query's attention entropy in nats (-sum p log p = max + log Z - sum p * logit).

The torch path of `probes.py` builds a float32 [B, Hq, R, N] logit tensor and makes about ten
passes over it (mask, softmax, log, products, block sums); this reads K once per query tile and
writes 3 x [B, Hq, R, nk]. Its reference is `block_stats_reference` below (plain torch, the same
three numbers); `probes.probe_attention` is THE place that picks one path or the other. Imports
nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import os

import torch

from .triton_attention import available, triton

QUERY_TILE = 16   # probed queries per program (tl.dot needs at least 16)
KEY_BLOCKS = 16   # key blocks per program, one after the other (fewer, longer programs)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _block_stats(Q, K, POS, MX, SE, SL, sqb, sqh, sqn, skb, skh, skn, H, G, R, N, NK, scale,
                     BLOCK: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, KB: tl.constexpr,
                     IEEE: tl.constexpr):
        pid_bh = tl.program_id(0)
        tile = tl.program_id(1)
        chunk = tl.program_id(2)                               # key blocks chunk * KB .. + KB - 1
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        r = tile * BR + tl.arange(0, BR)
        pos = tl.load(POS + r, mask=r < R, other=-1)            # padded query slots see no key
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + pos.to(tl.int64)[:, None] * sqn + d[None, :],
                    mask=(r < R)[:, None], other=0.0)
        rows = (b * H + h) * R * NK + r.to(tl.int64) * NK
        for t in range(KB):
            j = chunk * KB + t
            keys = j * BLOCK + tl.arange(0, BLOCK)
            k = tl.load(K + b * skb + (h // G) * skh + keys.to(tl.int64)[:, None] * skn + d[None, :],
                        mask=(keys < N)[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale              # 16-bit inputs: exact products, fp32 sums
            seen = (keys[None, :] <= pos[:, None]) & (keys[None, :] < N)
            m = tl.max(tl.where(seen, s, float("-inf")), 1)
            e = tl.where(seen, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 0.0)
            ok = r < R * (j < NK).to(tl.int32)           # past the last key block: store nothing
            tl.store(MX + rows + j, m, mask=ok)
            tl.store(SE + rows + j, tl.sum(e, 1), mask=ok)
            tl.store(SL + rows + j, tl.sum(e * tl.where(seen, s, 0.0), 1), mask=ok)


# head dims whose GPU test (`pytest -m gpu tests/test_triton_probe.py`: every statistic within 1e-4
# of the torch path at 8K and 32K) passed on an H200: 64 (SmolLM2) in the seventh session of
# 2026-11-29, 256 (Gemma 3) in the eighth. The benchmark's A/B (SmolLM2, level 0.9) swings with the
# host: 0.95 ms less at 32K and 3.7 ms less at 64K in one run, 6.1 ms more at 32K and 3.9 ms less at
# 64K in the next (`docs/results/h200_e2e_split_kernel.json`, `sparse_kernels/bench/h200.json`)
GPU_CHECKED_HEAD_DIMS = (64, 256)


def fused_probe_enabled(device: torch.device, head_dim: int) -> bool:
    """Whether the probe runs through this kernel. SPARSE_FUSED_PROBE=1: wherever Triton runs (CUDA,
    or the CPU interpreter in tests); 0: never; unset: on CUDA at the head dims of
    `GPU_CHECKED_HEAD_DIMS` only. The probe statistics are features, and a calibrated checkpoint's
    guarantee holds only for features computed as its labels' were, so a head dim joins the default
    only after its GPU test has passed."""
    flag = os.environ.get("SPARSE_FUSED_PROBE")
    if flag is not None and flag not in ("0", "1"):
        raise ValueError(f"SPARSE_FUSED_PROBE must be 0 or 1, got {flag!r}")
    if flag is None:
        return device.type == "cuda" and head_dim in GPU_CHECKED_HEAD_DIMS and available(device)
    return flag == "1" and available(device)


def supports(q: torch.Tensor, block_size: int) -> bool:
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d >= 16 and d & (d - 1) == 0
            and d <= 256 and block_size in (16, 32, 64, 128))


def probe_block_stats(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, scale: float, block_size: int):
    """q [B, Hq, N, D], k [B, Hkv, N, D], pos [R] (query positions) -> (max, sum exp, sum exp * logit),
    each [B, Hq, R, nk] float32 (max -inf and sums 0 for a block no probed query may see)."""
    b, hq, n, d = q.shape
    nk, r = -(-n // block_size), pos.shape[0]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    stats = torch.empty((3, b, hq, r, nk), dtype=torch.float32, device=q.device)
    kb = min(KEY_BLOCKS, nk)
    grid = (b * hq, triton.cdiv(r, QUERY_TILE), triton.cdiv(nk, kb))
    _block_stats[grid](q, k, pos.to(torch.int32), stats[0], stats[1], stats[2], *q.stride()[:3], *k.stride()[:3],
                       hq, hq // k.shape[1], r, n, nk, scale, BLOCK=block_size, BR=QUERY_TILE, D=d, KB=kb,
                       IEEE=q.dtype == torch.float32, num_warps=4)
    return stats[0], stats[1], stats[2]


def block_stats_reference(q, k, pos: torch.Tensor, scale: float, block_size: int):
    """The same three [B, Hq, R, nk] tensors in plain torch (float32 logits, causal per position)."""
    from .select import group_scores
    n = q.shape[2]
    nk = -(-n // block_size)
    s = group_scores(q[:, :, pos].float(), k.float()) * scale
    s = torch.nn.functional.pad(s, (0, nk * block_size - n), value=float("-inf")).unflatten(-1, (nk, block_size))
    keys = torch.arange(nk * block_size, device=q.device).view(nk, block_size)
    s = s.masked_fill(keys[None, None, None] > pos[None, None, :, None, None], float("-inf"))
    m = s.amax(-1)
    e = torch.exp(s - m.nan_to_num(0.0, neginf=0.0)[..., None])
    return m, e.sum(-1), (e * s.nan_to_num(0.0, neginf=0.0)).sum(-1)


def combine_block_stats(mx: torch.Tensor, se: torch.Tensor, sl: torch.Tensor):
    """(softmax mass per key block [B, Hq, R, nk], entropy per query in nats [B, Hq, R])."""
    top = mx.amax(-1, keepdim=True)
    w = torch.exp(mx - top) * se                      # blocks nothing may see: exp(-inf) * 0 = 0
    z = w.sum(-1, keepdim=True)
    logit_mean = (torch.exp(mx - top) * sl).sum(-1) / z[..., 0]
    return w / z, (top[..., 0] + z[..., 0].log() - logit_mean).clamp_min(0.0)

