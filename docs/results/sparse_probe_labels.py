"""Study: what running the probe layers sparse costs in labels (analysis part; CPU).

The same 240 requests of store v2 (8 families x 5 lengths x indices 0-2 x classic and varied forms)
were labeled on one H200 under three plans (`sparse_probe_study.py` says what they are):

  python train.py --config configs/label_smollm2_gpu_v2.yaml "sparse.dense_layers=[0]" \
      data.samples_per_length=3 labeling.out=/tmp/lab_d0      # and [0,1] (d01); [] with probe_layers [0] (dn)

The three stores are kept in data/labels/smollm2-135m/sparse_probe/{d01,d0,dn}. d01 relabels v2's own plan: its differences from v2 are the labels' noise floor (v2 was labeled
in other batches; its classic half on 2 GPUs). Per plan and criterion: the mean label (largest grid
level with every level up to it safe), the share of requests safe at each level, and paired
against d01: how many requests lost or gained label, and the mean change.

  python docs/results/sparse_probe_labels.py data/labels/smollm2-135m/sparse_probe data/labels/smollm2-135m/v2 \
      --out docs/results/sparse_probe_labels.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from data.store import load_labels, sample_labels, write_json_atomic

PLANS = {"v2 (layers 0-1 dense, committed)": None, "d01": "d01", "d0": "d0", "dn": "dn"}
CRITERIA = {"gold": {"name": "gold", "tau": 0.1, "nll_reference": "gold", "require_score": True},
            "fidelity": {"name": "fidelity", "tau": 0.1, "nll_reference": "gold", "require_score": True}}
LEVELS = (0.5, 0.8, 0.9, 0.95)


def _labels(root, criterion, ids=None):
    df, _ = load_labels(root, criterion)
    if ids is not None:
        df = df[df["sample_id"].isin(ids)]
    lab = sample_labels(df).set_index("sample_id")["label"]
    safe = df.pivot_table(index="sample_id", columns="level", values="safe", aggfunc="first")
    return lab, safe, df


def summarize(labs_dir: str, v2: str) -> dict:
    out = {}
    for cname, crit in CRITERIA.items():
        base, _, df01 = _labels(f"{labs_dir}/d01", crit)
        ids = set(base.index)
        rows = {}
        for name, sub in PLANS.items():
            lab, safe, df = _labels(v2 if sub is None else f"{labs_dir}/{sub}", crit, ids)
            lab = lab.reindex(sorted(ids))
            diff = (lab - base.reindex(sorted(ids))).to_numpy()
            rows[name] = {"requests": int(lab.notna().sum()), "mean_label": round(float(lab.mean()), 4),
                          "safe_at": {str(lv): round(float(safe[lv].mean()), 4) for lv in LEVELS},
                          "vs_d01_lower": int((diff < -1e-9).sum()), "vs_d01_higher": int((diff > 1e-9).sum()),
                          "vs_d01_mean_change": round(float(np.nanmean(diff)), 4)}
        out[cname] = rows
    return out


def feature_gap(labs_dir: str) -> float:
    """Max abs difference of the probe features between d0 and d01 (the same by design)."""
    a, _ = load_labels(f"{labs_dir}/d0")
    b, _ = load_labels(f"{labs_dir}/d01")
    cols = [c for c in a.columns if c.startswith("f_probe")]
    a, b = a[a.level == 0].set_index("sample_id")[cols], b[b.level == 0].set_index("sample_id")[cols]
    return float((a - b.loc[a.index]).abs().to_numpy().max())


def noise_floor(labs_dir: str, v2: str) -> dict:
    """The same plan labeled twice (v2 and d01): how often the dense run itself differs."""
    a, _ = load_labels(f"{labs_dir}/d01")
    b, _ = load_labels(v2)
    a = a[a.level == 0].set_index("sample_id")
    b = b[b.level == 0].set_index("sample_id").loc[a.index]
    nll = (a["nll_gold"] - b["nll_gold"]).abs()
    return {"requests": len(a), "dense_answer_differs": int((a["answer"] != b["answer"]).sum()),
            "dense_score_differs": int((a["score"] != b["score"]).sum()),
            "dense_nll_gold_abs_diff_median": round(float(nll.median()), 4),
            "dense_nll_gold_abs_diff_max": round(float(nll.max()), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("labs")
    p.add_argument("v2")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {"criteria": summarize(args.labs, args.v2), "probe_feature_max_abs_diff_d0_vs_d01": feature_gap(args.labs),
              "same_plan_twice": noise_floor(args.labs, args.v2)}
    write_json_atomic(args.out, result)
    for cname, rows in result["criteria"].items():
        print(f"\n{cname}: plan | mean label | safe at {' / '.join(map(str, LEVELS))} | lower / higher than d01 | mean change")
        for name, r in rows.items():
            print(f"{name} | {r['mean_label']} | {' / '.join(str(v) for v in r['safe_at'].values())} | "
                  f"{r['vs_d01_lower']} / {r['vs_d01_higher']} | {r['vs_d01_mean_change']}")
    print("probe features, d0 vs d01, max abs diff:", result["probe_feature_max_abs_diff_d0_vs_d01"])
    print("the same plan labeled twice (v2, d01), dense run:", result["same_plan_twice"])


if __name__ == "__main__":
    main()
