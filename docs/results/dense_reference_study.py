"""Study: is the labeler's dense answer the answer a request gets when it is served dense?

The labeler prefills one request at every grid level as the rows of one batch, then decodes
`labeling.batch_samples` requests stacked. The dense row's greedy answer is the reference of both
criteria (`fidelity` compares the sparse answers to it). A request served dense runs alone, through
transformers' SDPA. Stores compared on the same 240 requests of store v2 (see sparse_probe.md):
- `sdpa1`: served dense: grid [0.0] (every layer SDPA) and one request per batch;
- v2 (flex backend, its dense row through FlexAttention at density 1, batches of 16 or 8 on 2 GPUs);
- `d01`: triton backend, the dense row through the Triton kernel at density 1, batches of 16;
- `d01sdpa`: as `d01`, after the dense row of a mixed batch runs SDPA (commit 18aa09e).

  python train.py --config configs/label_smollm2_gpu_v2.yaml data.samples_per_length=3 \
      "labeling.grid=[0.0]" labeling.batch_samples=1 labeling.out=/tmp/lab_sdpa1
  python docs/results/dense_reference_study.py data/labels/smollm2-135m/sparse_probe --out F.json
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from data.store import load_labels, write_json_atomic
from data.tasks.scoring import normalise_answer

STORES = {"v2 (flex, committed)": "data/labels/smollm2-135m/v2", "d01 (triton)": "d01",
          "d01sdpa (triton, dense row SDPA)": "d01sdpa"}


def _dense(root: str):
    df, _ = load_labels(root)
    return df[df.level == 0].set_index("sample_id")


def agreement(labs: str) -> dict:
    ref = _dense(f"{labs}/sdpa1")
    out = {"requests": len(ref)}
    for name, sub in STORES.items():
        root = sub if "/" in sub else f"{labs}/{sub}"
        if not os.path.isdir(root):
            continue
        d = _dense(root).reindex(ref.index)
        same = d["answer"] == ref["answer"]
        norm = [normalise_answer(t, a) == normalise_answer(t, b) for t, a, b in zip(ref["task"], d["answer"], ref["answer"])]
        prefix = [len(os.path.commonprefix([a, b])) for a, b in zip(d["answer"][~same], ref["answer"][~same])]
        out[name] = {"dense_answer_equals_served": int(same.sum()),
                     "normalised_answer_equals_served": int(sum(norm)),   # what `fidelity` compares
                     "dense_score_equals_served": int((d["score"] == ref["score"]).sum()),
                     "common_prefix_chars_median_where_different": float(np.median(prefix)) if prefix else None,
                     "nll_gold_abs_diff_median": round(float((d["nll_gold"] - ref["nll_gold"]).abs().median()), 5),
                     "nll_gold_abs_diff_max": round(float((d["nll_gold"] - ref["nll_gold"]).abs().max()), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("labs")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = agreement(args.labs)
    write_json_atomic(args.out, result)
    print(f"{result['requests']} requests; served dense = sdpa1")
    for name, r in result.items():
        if isinstance(r, dict):
            print(name, r)


if __name__ == "__main__":
    main()
