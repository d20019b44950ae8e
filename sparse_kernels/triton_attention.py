"""Triton block-sparse causal prefill attention (forward), the `triton` backend.

Owns `block_sparse_attention(q, k, v, counts, indices, block_size, scale)` -> (out, lse) and
`triton_block_attention` (the backend entry point taking a bool block mask). Each program owns one
BLOCK_M-row query tile of one (batch row, query head) and walks only that query block's kept KV
blocks, read from a per-(row, head, query block) index (`flex.kv_index` format: counts + ascending
ids), so skipped blocks cost nothing; rows of a batch may carry different levels. GQA: query head h
reads KV head h // (Hq / Hkv) (no K/V copies). Online softmax in fp32 with exp2; the causal mask is
applied only to tiles that cross the diagonal or the sequence end. Rows with no visible key give
zeros and lse = -inf. The plain-torch ground truth is `reference.py` (tests compare against it).
Order: helpers -> autotune configs (keyed on shapes) -> kernel -> wrapper with shape checks -> public.
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the backend reports itself unavailable
    triton = tl = None

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------- helpers

def available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def supports(q: torch.Tensor, block_size: int, key_valid) -> bool:
    """Shapes this kernel handles; anything else goes to another backend."""
    return (key_valid is None and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
            and block_size in (16, 32, 64, 128) and available(q.device))


# ---------------------------------------------------------------- autotune configs

def _configs():
    if triton is None:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3),
                               (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 64, 8, 3),
                               (64, 32, 4, 3), (32, 32, 4, 2)]]


def _prune(configs, named_args, **kwargs):
    """Keep tiles that divide the sparse block (a query tile never spans two query blocks)."""
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    head_dim = kwargs.get("D", named_args.get("D"))
    kept = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0
            and not (head_dim >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64 and c.num_stages > 2)]
    return kept or [triton.Config({"BLOCK_M": min(block, 16), "BLOCK_N": min(block, 16)}, num_warps=4, num_stages=1)]


# ---------------------------------------------------------------- kernel

if triton is not None:
    @triton.autotune(configs=_configs(), key=["BLOCK", "D", "GROUP", "N_BUCKET"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _block_sparse_fwd(Q, K, V, O, LSE, COUNTS, INDICES,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                          slb, slh, sib, sih, siq, scb, sch,
                          N, H, GROUP, qk_scale, N_BUCKET,  # N_BUCKET: power of two >= N, the autotune key
                          BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)                 # query tile
        pid_bh = tl.program_id(1)                # (batch row, query head)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP                          # GQA: the KV head of this query head
        q_start = pid_m * BLOCK_M
        q_block = q_start // BLOCK
        offs_m = q_start + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
        offs_d = tl.arange(0, D)                                       # [D]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=offs_m[:, None] < N, other=0.0)               # [BLOCK_M, D]
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        count = tl.load(COUNTS + b * scb + h * sch + q_block)
        idx_row = INDICES + b * sib + h * sih + q_block * siq
        for i in range(0, count):
            kv_block = tl.load(idx_row + i)
            for sub in tl.static_range(BLOCK // BLOCK_N):
                start_n = kv_block * BLOCK + sub * BLOCK_N
                offs_n = start_n + tl.arange(0, BLOCK_N)               # [BLOCK_N]
                k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None],
                            mask=offs_n[None, :] < N, other=0.0)       # [D, BLOCK_N]
                qk = tl.dot(q, k) * qk_scale                           # [BLOCK_M, BLOCK_N], log2 units
                if (start_n + BLOCK_N > q_start + 1) | (start_n + BLOCK_N > N):   # crosses diagonal or end
                    visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < N)
                    qk = tl.where(visible, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
                p = tl.math.exp2(qk - m_ref[:, None])
                alpha = tl.math.exp2(m_i - m_ref)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :],
                            mask=offs_n[:, None] < N, other=0.0)       # [BLOCK_N, D]
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < N)
        tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < N)


# ---------------------------------------------------------------- wrapper

def _check(q, k, v, counts, indices, block_size):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be [B, Hq, N, D] and k, v [B, Hkv, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (Hq must be a multiple of Hkv)")
    nq = -(-n // block_size)
    if counts.shape != (b, hq, nq) or indices.shape[:3] != (b, hq, nq):
        raise ValueError(f"index must be counts [B, Hq, {nq}] and indices [B, Hq, {nq}, K]; got "
                         f"{tuple(counts.shape)}, {tuple(indices.shape)}")
    if d not in SUPPORTED_HEAD_DIMS or q.dtype not in SUPPORTED_DTYPES or not (k.dtype == v.dtype == q.dtype):
        raise ValueError(f"head dim {d} / dtype {q.dtype} not supported (dims {SUPPORTED_HEAD_DIMS}, bf16/fp16/fp32)")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                           indices: torch.Tensor, block_size: int, scale: float | None = None):
    """q [B, Hq, N, D], k/v [B, Hkv, N, D]; counts [B, Hq, nq] and indices [B, Hq, nq, K] (kept KV
    block ids first, ascending) -> (out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32, natural log)."""
    _check(q, k, v, counts, indices, block_size)
    b, hq, n, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    counts, indices = counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _block_sparse_fwd[grid](q, k, v, out, lse, counts, indices,
                            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                            *lse.stride()[:2], *indices.stride()[:3], *counts.stride()[:2],
                            n, hq, hq // k.shape[1], scale * LOG2E, triton.next_power_of_2(n), BLOCK=block_size, D=d)
    return out, lse


# ---------------------------------------------------------------- public backend

def triton_block_attention(q, k, v, block_mask, block_size, scale=None):
    """bool block mask [B, Hq, nq, nk] -> out [B, Hq, N, D] (the backend registry's form)."""
    from .flex import kv_index
    counts, indices = kv_index(block_mask)
    return block_sparse_attention(q, k, v, counts, indices, block_size, scale)[0]
