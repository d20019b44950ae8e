"""Triton block-sparse causal prefill attention (forward), the `triton` backend.

Owns `block_sparse_attention(q, k, v, counts, indices, block_size, scale, loads)` -> (out, lse) and
`triton_block_attention` (the backend entry point taking a bool block mask). Each program owns one
BLOCK_M-row query tile of one (batch row, query head) and walks only that query block's kept KV
blocks, read from a per-(row, head, query block) index (counts + ids: `flex.kv_index` or the
selection's own), so skipped blocks cost nothing; rows of a batch may carry different levels.
With ids ascending and causal (loop "split") every block but the last runs in one unmasked,
unbranched loop and only the last (the diagonal) is masked, over just the sub-tiles that reach the
tile's rows; loop "masked" takes ids in any order and checks each tile; by default the autotuner
times both per shape and keeps the faster.
GQA: query head h reads KV head h // (Hq / Hkv) (no K/V copies). K/V tiles come through
Hopper's tensor-copy engine (TMA descriptors, `loads="tma"`, the default on compute capability 9+)
or plain pointer loads. Online softmax in fp32 with exp2, P @ V accumulated in the tensor-core
accumulator; the causal mask is applied only to tiles that cross the diagonal or the sequence end.
Each head's query tiles launch last-first, so the longest rows do not trail. Rows with no visible
key give zeros and lse = -inf. The plain-torch ground truth is `reference.py` (tests compare).
Order: helpers -> autotune configs (keyed on shapes) -> kernel -> wrapper with shape checks -> public.
Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the backend reports itself unavailable
    triton = tl = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)   # what the kernel computes (tested against the reference)
# what the adapter's `auto`/`triton` dispatch sends to it: every supported dim. Head dim 256 (Gemma 3)
# joined after one H200 run (`python -m controller.benchmark --shapes 4:1:256:64`, in
# sparse_kernels/bench/h200_gemma3.json): 0.48-0.62x FlexAttention's time at 16K and 32K, every kept level
DISPATCHED_HEAD_DIMS = SUPPORTED_HEAD_DIMS
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------- helpers

def available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def supports(q: torch.Tensor, block_size: int, key_valid) -> bool:
    """Shapes this kernel handles; anything else goes to another backend."""
    return (key_valid is None and q.shape[-1] in DISPATCHED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
            and block_size in (16, 32, 64, 128) and available(q.device))


# ---------------------------------------------------------------- autotune configs

LOADS = ("pointer", "tma")  # how K/V tiles are read: pointer loads, or Hopper's tensor-copy engine (TMA)


def _set_block_shapes(nargs):
    """TMA descriptors carry their tile shape, which depends on the config being tried."""
    for name, rows in (("desc_q", nargs["BLOCK_M"]), ("desc_k", nargs["BLOCK_N"]), ("desc_v", nargs["BLOCK_N"])):
        if TensorDescriptor is not None and isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, rows, nargs["D"]]


def _configs(tma: bool, splits: tuple[bool, ...]):
    """Tiles x loop forms (SPLIT: see `default_loop`); the autotuner times each and keeps the best."""
    if triton is None:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":   # one config per form: the interpreter is slow
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "TMA": tma, "SPLIT": splits[0]}, num_warps=4,
                              num_stages=1, pre_hook=_set_block_shapes)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": tma, "SPLIT": split}, num_warps=w, num_stages=s,
                          pre_hook=_set_block_shapes)
            for split in splits
            for m, n, w, s in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                               (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 6), (64, 64, 4, 2),
                               (64, 32, 4, 3)]]


# head dim 256: 64-row query tiles (the fp32 accumulator alone is 64 x 256), two stages (a K and a V
# tile of 64 x 256 bf16 are 64 KB per stage), 4 or 8 warps
_D256_TILES = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)]


def _prune(configs, named_args, **kwargs):
    """Keep tiles that divide the sparse block (a query tile never spans two query blocks) and fit
    in shared memory at D = 128; at D = 256 the tiles of `_D256_TILES` that divide it."""
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    head_dim = kwargs.get("D", named_args.get("D"))
    splits = sorted({c.kwargs["SPLIT"] for c in configs})
    if head_dim >= 256 and os.environ.get("TRITON_INTERPRET") != "1":
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": configs[0].kwargs["TMA"], "SPLIT": split},
                                 num_warps=w, num_stages=st, pre_hook=_set_block_shapes)
                   for split in splits for m, n, w, st in _D256_TILES]
    kept = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0
            and not (head_dim >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64 and c.num_stages > 2)]
    if kept:
        return kept
    extra = {"TMA": configs[0].kwargs["TMA"], "SPLIT": splits[-1]}
    return [triton.Config({"BLOCK_M": min(block, 16), "BLOCK_N": min(block, 16), **extra}, num_warps=4,
                          num_stages=1, pre_hook=_set_block_shapes)]


# ---------------------------------------------------------------- kernel

if triton is not None:
    @triton.jit
    def _load_k(K, desc_k, b, hk, start_n, offs_n, offs_d, skn, N,
                BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
        """K tile as [D, BLOCK_N]; zeros past the sequence end."""
        if TMA:
            return tl.trans(desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, D))
        return tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=offs_n[None, :] < N, other=0.0)

    @triton.jit
    def _load_v(V, desc_v, b, hk, start_n, offs_n, offs_d, svn, N,
                BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
        """V tile as [BLOCK_N, D]; zeros past the sequence end."""
        if TMA:
            return desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
        return tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)

    @triton.jit
    def _attend(q, acc, m_i, l_i, k_base, v_base, desc_k, desc_v, b, hk, start_n, q_start, offs_m, offs_d, skn, svn, N,
                qk_scale, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
        """One K/V tile into the online softmax (log2 units). MASKED: a tile that crosses the diagonal
        or the sequence end gets the causal and end mask, and rows that have seen no key yet keep a
        zero reference (their p is 0, not NaN); unMASKED tiles must lie wholly before the tile's rows."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_k(k_base, desc_k, b, hk, start_n, offs_n, offs_d, skn, N, BLOCK_N, D, TMA)
        qk = tl.dot(q, k)                                              # [BLOCK_M, BLOCK_N]
        if MASKED:
            if (start_n + BLOCK_N > q_start + 1) | (start_n + BLOCK_N > N):
                visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < N)
                qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_ref = m_new
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])               # one FMA per element
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_v(v_base, desc_v, b, hk, start_n, offs_n, offs_d, svn, N, BLOCK_N, D, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _block_sparse_fwd(Q, K, V, O, LSE, COUNTS, INDICES, desc_q, desc_k, desc_v,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                          slb, slh, sib, sih, siq, scb, sch,
                          N, H, GROUP, qk_scale, N_BUCKET, K_BUCKET,  # buckets: autotune keys only
                          BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          TMA: tl.constexpr, SPLIT: tl.constexpr):   # SPLIT: from the config
        # query tile: fastest, so the programs running together share one head's K/V in L2; last
        # tile first, so the longest rows start first (2-8.5% faster at D = 128, neutral at 64)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)                # (batch row, query head)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP                          # GQA: the KV head of this query head
        q_start = pid_m * BLOCK_M
        q_block = q_start // BLOCK
        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        if TMA:
            q = desc_q.load([b, h, q_start, 0]).reshape(BLOCK_M, D)
        else:
            q = tl.load(Q + b64 * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=offs_m[:, None] < N, other=0.0)
        k_base = K + b64 * skb + hk.to(tl.int64) * skh
        v_base = V + b64 * svb + hk.to(tl.int64) * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        count = tl.load(COUNTS + b * scb + h * sch + q_block)
        idx_row = INDICES + b64 * sib + h * sih + q_block * siq
        SUBS: tl.constexpr = BLOCK // BLOCK_N
        if SPLIT:
            # ids ascending and causal: every block but the last lies wholly before this tile's
            # first row, so their loop runs unmasked and unbranched
            for i in range(0, count - 1):
                kv_start = tl.load(idx_row + i) * BLOCK
                for sub in tl.static_range(SUBS):
                    acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, desc_k, desc_v, b, hk,
                                            kv_start + sub * BLOCK_N, q_start, offs_m, offs_d, skn, svn, N, qk_scale,
                                            BLOCK_N, D, TMA, False)
            # the last (the diagonal block when kept): only the sub-tiles that reach a row of this tile
            last = tl.load(idx_row + tl.maximum(count - 1, 0)) * BLOCK
            reach = tl.minimum(SUBS, tl.cdiv(q_start + BLOCK_M - last, BLOCK_N))
            for s in range(0, tl.where(count > 0, reach, 0)):
                acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, desc_k, desc_v, b, hk, last + s * BLOCK_N,
                                        q_start, offs_m, offs_d, skn, svn, N, qk_scale, BLOCK_N, D, TMA, True)
        else:  # any order: each tile checks whether it needs the mask
            for i in range(0, count):            # loads stay outside any branch: they are pipelined
                kv_block = tl.load(idx_row + i)
                for sub in tl.static_range(SUBS):
                    start_n = kv_block * BLOCK + sub * BLOCK_N
                    acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_base, v_base, desc_k, desc_v, b, hk, start_n,
                                            q_start, offs_m, offs_d, skn, svn, N, qk_scale, BLOCK_N, D, TMA, True)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(O + b64 * sob + h.to(tl.int64) * soh + offs_m[:, None] * son + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
        tl.store(LSE + b64 * slb + h * slh + offs_m, lse, mask=offs_m < N)


# ---------------------------------------------------------------- wrapper

_AUTOTUNED: dict = {}


def _autotuned(loads: str, loop: str):
    """One autotuned kernel per (load path, loop forms tried), keyed on the shapes that move the best
    tile and form: sparse block, head dim, GQA group, length bucket and the widest row's bucket."""
    if (loads, loop) not in _AUTOTUNED:
        splits = {"auto": (True, False), "split": (True,), "masked": (False,)}[loop]
        _AUTOTUNED[loads, loop] = triton.autotune(
            configs=_configs(loads == "tma", splits), key=["BLOCK", "D", "GROUP", "N_BUCKET", "K_BUCKET"],
            prune_configs_by={"early_config_prune": _prune})(_block_sparse_fwd)
    return _AUTOTUNED[loads, loop]


LOOPS = ("auto", "split", "masked")


def default_loop() -> str:
    """How the kernel walks a row's blocks: "split" (ids ascending and causal, as both selections
    and `flex.kv_index` of a causal mask write them: one unmasked loop, then the last block),
    "masked" (any order: every tile checks whether it crosses the diagonal), or "auto" (the
    default: the autotuner times both per shape and keeps the faster; on one H200 split was 3-13%
    faster at head dim 64 and 2-8% slower at 128). SPARSE_KERNEL_LOOP overrides (A/B runs)."""
    loop = os.environ.get("SPARSE_KERNEL_LOOP", "auto")
    if loop not in LOOPS:
        raise ValueError(f"SPARSE_KERNEL_LOOP must be one of {LOOPS}, got {loop!r}")
    return loop


def chosen_config(device: torch.device, loop: str | None = None) -> str | None:
    """The tile and loop form (SPLIT) the autotuner kept for its latest shape key on this device's
    load path, as text (benchmark rows record it); None before any autotuned call."""
    tuner = _AUTOTUNED.get((default_loads(device), loop or default_loop()))
    best = getattr(tuner, "best_config", None)
    return None if best is None else str(best)


@functools.lru_cache(maxsize=None)
def default_loads(device: torch.device) -> str:
    """TMA on Hopper and newer (compute capability >= 9), pointer loads elsewhere (once per device)."""
    if TensorDescriptor is None:
        return "pointer"
    if device.type == "cuda":
        return "tma" if torch.cuda.get_device_capability(device)[0] >= 9 else "pointer"
    return "tma"  # the interpreter runs the TMA path too (tests)


def _descriptors(q, k, v, loads: str):
    if loads != "tma":
        return q, k, v  # unused placeholders
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]]) for t in (q, k, v))


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


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a contiguous last dim, 16-byte aligned strides and base address."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                           indices: torch.Tensor, block_size: int, scale: float | None = None,
                           loads: str | None = None, loop: str | None = None):
    """q [B, Hq, N, D], k/v [B, Hkv, N, D]; counts [B, Hq, nq] and indices [B, Hq, nq, K] (the first
    counts[b, h, i] entries of row i are its kept KV block ids: ascending and causal (<= i) unless
    loop="masked", which takes any order) -> (out [B, Hq, N, D] in q's dtype, a
    view of a [B, N, Hq, D] tensor: the layout transformers reshapes next, so the adapter's transpose
    needs no copy; lse [B, Hq, N] fp32, natural log). `loads`: "pointer" | "tma" (default per device)."""
    _check(q, k, v, counts, indices, block_size)
    b, hq, n, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    loads = loads or default_loads(q.device)
    if loads == "tma" and (d > 128 or not all(_tma_ready(t) for t in (q, k, v))):
        loads = "pointer"   # head dim 256: a 512-byte TMA row is untested on the GPU; pointer loads
    counts, indices = counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()
    out = torch.empty((b, n, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)   # stored as [B, N, Hq, D]
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
    loop = loop or default_loop()
    if loads not in LOADS or loop not in LOOPS:
        raise ValueError(f"loads must be one of {LOADS} and loop one of {LOOPS}; got {loads!r}, {loop!r}")
    _autotuned(loads, loop)[grid](
        q, k, v, out, lse, counts, indices, *_descriptors(q, k, v, loads),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *lse.stride()[:2], *indices.stride()[:3], *counts.stride()[:2],
        n, hq, hq // k.shape[1], scale * LOG2E, triton.next_power_of_2(n),
        triton.next_power_of_2(max(indices.shape[-1], 1)), BLOCK=block_size, D=d)
    return out, lse


# ---------------------------------------------------------------- public backend

def triton_block_attention(q, k, v, block_mask, block_size, scale=None):
    """bool block mask [B, Hq, nq, nk] -> out [B, Hq, N, D] (the backend registry's form)."""
    from .flex import kv_index
    counts, indices = kv_index(block_mask.tril())   # blocks above the diagonal are invisible anyway
    return block_sparse_attention(q, k, v, counts, indices, block_size, scale)[0]
