"""Kernel benchmark: dense SDPA (causal) vs FlexAttention vs the Triton kernel on one block index.

Owns `bench_kernels` (rows of timings, medians of `triton.testing.do_bench`) and `kernel_table`.
For each shape (Hq, Hkv, D, block), length N and target kept fraction, the block index comes from
the real selector (`select_blocks`, block_topk at density = kept) on random q/k, and is timed on its
own (`ms_select`: the Triton selection of `triton_select.py` writing only the kernel's index, as the
adapter runs it for the triton backend; `ms_select_torch`: the plain-torch selection with its mask,
for comparison; `fused_select_equal`: both pick the same blocks); FlexAttention gets it as
a prebuilt `BlockMask` (full blocks below the diagonal, partial diagonal blocks), the Triton kernel
as counts + indices straight from top-k, so both time attention only.
`kept` is the achieved fraction of causal blocks computed. Dense SDPA gets K/V expanded to Hq
heads outside the timing (its fastest path). The command line lives in `controller/benchmark.py`
(it adds the end-to-end model rows). Imports nothing from `data/` or `controller/`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .flex import _compiled_flex, _split_full_partial, kv_index
from .backends import selection
from .select import SelectionSpec, block_accounting, select_blocks_with_index
from .triton_attention import block_sparse_attention, chosen_config

SHAPES = ((32, 8, 128, 128), (9, 3, 64, 64))   # (Hq, Hkv, D, block)
LENGTHS = (8192, 32768, 65536, 131072)
KEPT = (1.0, 0.2, 0.1, 0.05)


def _bench(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _flex_call(q, k, v, mask: torch.Tensor, block: int):
    from torch.nn.attention.flex_attention import BlockMask
    n = q.shape[2]
    partial, full = _split_full_partial(mask)
    pc, pi = kv_index(partial)
    fc, fi = kv_index(full)
    bm = BlockMask.from_kv_blocks(pc, pi, full_kv_num_blocks=fc, full_kv_indices=fi, BLOCK_SIZE=block,
                                  mask_mod=lambda b, h, qi, ki: (qi >= ki) & mask[b, h, qi // block, ki // block],
                                  seq_lengths=(n, n))
    options = {"BLOCK_M": min(block, 128), "BLOCK_N": min(block, 128)}
    if q.shape[-1] >= 128 and block >= 128:
        options = {"BLOCK_M": 128, "BLOCK_N": 64}  # at D = 128 (128 x 128 tiles not tried for flex)
    flex = _compiled_flex()
    return lambda: flex(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)


def _timed(row: dict, key: str, fn) -> None:
    try:
        row[key] = round(_bench(fn), 4)
    except Exception as e:  # noqa: BLE001 - one failing method must not lose the other rows
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def bench_point(q, k, v, k_dense, v_dense, kept_target: float, block: int, ms_sdpa: float) -> dict:
    hq, hkv, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    spec = SelectionSpec(block_size=block)
    density = torch.tensor([kept_target], dtype=torch.float64)
    fused = selection(q.device, "triton")
    select = lambda f: select_blocks_with_index(q, k, density, spec, 1 / math.sqrt(d), fused=f)  # noqa: E731
    index_only = lambda: select_blocks_with_index(q, k, density, spec, 1 / math.sqrt(d), with_mask=False,  # noqa: E731
                                                  fused=fused)
    mask, counts, idx = select(None)
    kept_blocks, causal = block_accounting(mask)
    row = {"N": n, "hq": hq, "hkv": hkv, "d": d, "block": block, "kept_target": kept_target,
           "kept": round(float(kept_blocks[0]) / causal, 4), "ms_sdpa": ms_sdpa}
    _timed(row, "ms_select_torch", lambda: select(None))
    _timed(row, "ms_select", index_only)  # what the adapter runs for triton
    row["fused_select_equal"] = bool(torch.equal(select(fused)[0], mask))
    flex = _flex_call(q, k, v, mask, block)
    _timed(row, "ms_flex", flex)
    triton_fn = lambda: block_sparse_attention(q, k, v, counts, idx, block)[0]  # noqa: E731
    _timed(row, "ms_triton", triton_fn)
    row["triton_config"] = chosen_config(q.device)   # tile and loop form (SPLIT) the autotuner kept
    if row["ms_flex"] and row["ms_triton"]:  # the two kernels compute the same thing
        a, b = triton_fn().float(), flex().float()
        row["rel_diff_triton_flex"] = float((a - b).norm() / b.norm())
    flops = 4.0 * d * float(kept_blocks[0]) * block * block  # over kept blocks, all heads
    for name in ("flex", "triton"):
        ms = row.get(f"ms_{name}")
        row[f"tflops_{name}"] = round(flops / (ms * 1e-3) / 1e12, 1) if ms else None
    ideal = row["kept"] * ms_sdpa
    row["ms_ideal"] = round(ideal, 4)
    if row.get("ms_triton") and row.get("ms_flex"):
        row["triton_over_flex"] = round(row["ms_triton"] / row["ms_flex"], 3)
    if row.get("ms_triton"):
        row["triton_over_ideal"] = round(row["ms_triton"] / ideal, 3)
        row["select_share"] = round(row["ms_select"] / row["ms_triton"], 3) if row.get("ms_select") else None
        row["select_share_torch"] = round(row["ms_select_torch"] / row["ms_triton"], 3) if row.get("ms_select_torch") else None
    return row


def bench_kernels(shapes=SHAPES, lengths=LENGTHS, kept=KEPT, dtype=torch.bfloat16, log=print) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for hq, hkv, d, block in shapes:
        for n in lengths:
            q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
            k_dense, v_dense = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
            ms_sdpa = round(_bench(lambda: F.scaled_dot_product_attention(q, k_dense, v_dense, is_causal=True)), 4)
            for fraction in kept:
                row = bench_point(q, k, v, k_dense, v_dense, fraction, block, ms_sdpa)
                row["device"] = torch.cuda.get_device_name()
                rows.append(row)
                log(kernel_table([row], header=not rows[:-1]))
            del q, k, v, k_dense, v_dense
            torch.cuda.empty_cache()
    return rows


COLUMNS = ("N", "hq", "hkv", "d", "block", "kept", "ms_sdpa", "ms_flex", "ms_triton", "ms_ideal", "ms_select",
           "ms_select_torch",
           "tflops_flex", "tflops_triton", "triton_over_flex", "triton_over_ideal")


def kernel_table(rows: list[dict], header: bool = True) -> str:
    lines = (["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] if header else [])
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def bench_probe_cost(shapes=SHAPES, lengths=(8192, 32768), dtype=torch.bfloat16, log=print) -> list[dict]:
    """Cost of one probe layer's statistics on random q/k (batch 1): the last-queries statistics
    alone, the mass recall alone (8 sampled query blocks x 8 levels of the selection), and the
    whole `attention_probe`, against dense SDPA of the same layer."""
    from .probes import attention_probe, last_query_attention, mass_recall
    rows = []
    for hq, hkv, d, block in shapes:
        spec = SelectionSpec(block_size=block)
        for n in lengths:
            q = torch.randn(1, hq, n, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2))
            scale = 1.0 / math.sqrt(d)
            kd, vd = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            row = {"N": n, "hq": hq, "hkv": hkv, "d": d, "block": block,
                   "ms_sdpa_layer": round(_bench(lambda: F.scaled_dot_product_attention(q, kd, vd, is_causal=True)), 4),
                   "ms_last_queries": round(_bench(lambda: last_query_attention(q, k, 64, scale)), 4),
                   "ms_mass_recall": round(_bench(lambda: mass_recall(q, k, scale, spec)), 4),
                   "ms_attention_probe": round(_bench(lambda: attention_probe(q, k, scale, 64, block, None, spec)), 4)}
            rows.append(row)
            log(row)
    return rows
