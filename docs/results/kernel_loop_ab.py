"""A/B of the Triton kernel's loop forms on one GPU: the previous kernel ("old", the file
sparse_kernels/triton_attention.py of commit b17b1eb, saved as old_ta.py beside this script:
`git show b17b1eb:sparse_kernels/triton_attention.py | sed 's/from \\.flex/from sparse_kernels.flex/' > old_ta.py`)
against loop="split" and loop="masked" of today's kernel, on the same index (the fused selection at
each kept fraction), with dense SDPA as the ideal's base. Prints one row per point and writes
kab.json (device, versions, rows) under $OUT. Env: LOOPS (old,split,masked,auto), LENS, NSHAPES.
Results: docs/results/kernel_loop_ab_h200.json."""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

from sparse_kernels.backends import selection
from sparse_kernels.select import SelectionSpec, select_blocks_with_index
from sparse_kernels.triton_attention import _AUTOTUNED, block_sparse_attention

SHAPES = [(32, 8, 128, 128), (9, 3, 64, 64)][:int(os.environ.get("NSHAPES", "2"))]
LENGTHS = [int(x) for x in os.environ.get("LENS", "16384,32768,65536,131072").split(",")]
KEPT = [1.0, 0.2, 0.1, 0.05]
LOOPS = os.environ.get("LOOPS", "masked,split").split(",")


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def kernel_call(loop, q, k, v, counts, idx, block):
    if loop == "old":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import old_ta
        return lambda: old_ta.block_sparse_attention(q, k, v, counts, idx, block)[0], old_ta._AUTOTUNED["tma"]
    return (lambda: block_sparse_attention(q, k, v, counts, idx, block, loop=loop)[0]), None


def point(q, k, v, block, kept, sdpa) -> dict:
    hq, n, d = q.shape[1], q.shape[2], q.shape[3]
    _, counts, idx = select_blocks_with_index(q, k, torch.tensor([kept], dtype=torch.float64), SelectionSpec(block_size=block),
                                              1 / math.sqrt(d), with_mask=False, fused=selection(q.device, "triton"))
    nq = counts.shape[-1]
    frac = float(counts.sum()) / (hq * nq * (nq + 1) // 2)
    row = {"N": n, "hq": hq, "d": d, "block": block, "kept": round(frac, 4), "ms_sdpa": round(sdpa, 4)}
    outs = {}
    for loop in LOOPS:
        fn, tuner = kernel_call(loop, q, k, v, counts, idx, block)
        outs[loop] = fn().float()
        row[f"ms_{loop}"] = round(bench(fn), 4)
        row[f"over_ideal_{loop}"] = round(row[f"ms_{loop}"] / (frac * sdpa), 3)
        tuner = tuner or _AUTOTUNED.get(("tma", loop))
        row[f"cfg_{loop}"] = str(getattr(tuner, "best_config", ""))
    first = next(iter(outs.values()))
    row["max_rel_diff"] = max(float((o - first).norm() / first.norm()) for o in outs.values())
    return row


def main() -> None:
    rows, gen = [], torch.Generator(device="cuda").manual_seed(0)
    for hq, hkv, d, block in SHAPES:
        for n in LENGTHS:
            q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
            kd, vd = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
            sdpa = bench(lambda: F.scaled_dot_product_attention(q, kd, vd, is_causal=True))
            for kept in KEPT:
                rows.append(point(q, k, v, block, kept, sdpa))
                print({a: b for a, b in rows[-1].items() if not a.startswith("cfg")}, flush=True)
            del q, k, v, kd, vd
            torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "."), "kab.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
