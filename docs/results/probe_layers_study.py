"""One-off study (2026-11-29): do the probe statistics of later layers predict safety better, within
and across task families? Not part of the product; kept so that docs/results/probe_layers.md can be
reproduced (CPU, ~25 minutes for 960 requests on 2 cores):

  python docs/results/probe_layers_study.py collect data/labels/smollm2-135m/v2 /tmp/layers.json 120 2100
  python docs/results/probe_layers_study.py analyse /tmp/layers.json docs/results/probe_layers.json
  python docs/results/probe_layers_study.py collect-output-error data/labels/smollm2-135m/v2 /tmp/oe.json
  python docs/results/probe_layers_study.py analyse-output-error /tmp/oe.json fidelity   (and gold)

`collect`: up to PER_TASK requests per task of at most MAX_TOKENS tokens (seed 0), each through one
dense forward with every layer probed (`attention_probe`, the statistics the hook uses at layers 0-1).
`analyse`: labels under the label-free `fidelity` criterion; per variant (layers 0-1 as shipped, or
one layer), the held-out-family AUC of a logistic regression (that layer's statistics + log length,
trained on the other families) for "safe at level 0.5 / 0.8 / 0.9 / 0.95", mean over those levels,
and the within-family AUC of the mass recall at the same level.
`collect-output-error` (every request of the store, ~23 minutes): at layers 0 and 1 of a dense
forward, the relative L2 error of the attention OUTPUT at the probe's sampled queries when only the
blocks the selection keeps at each level are attended (renormalised), instead of the kept mass.
`analyse-output-error`: the same AUCs for those errors against the shipped features.
"""
import json
import sys
import time
import warnings

import numpy as np


def collect(root: str, out: str, per_task: int, max_tokens: int) -> None:
    import torch
    from data.backfill import _samples_of
    from data.config import SparseConfig, from_dict
    from data.labeling import realize
    from data.models import load_model
    from data.store import LabelStore
    from data.tasks import prompt_ids
    from sparse_kernels import SparsePlan, enable_sparse_attention, use_plan
    from sparse_kernels.probes import PROBE_STATS
    store = LabelStore(root)
    meta, table = store.meta(), store.table()
    first = table[table["level"] == 0.0].set_index("sample_id")
    first = first[first["n_tokens"] <= max_tokens]
    rng, pick = np.random.default_rng(0), []
    for _, grp in first.groupby("task"):
        ids = list(grp.index)
        rng.shuffle(ids)
        pick += ids[:per_task]
    lm = load_model(meta["model_name"], "bfloat16", "cpu")
    enable_sparse_attention(lm.model)
    sparse = from_dict(SparseConfig, meta["identity"]["sparse"])
    layers = range(lm.model.config.num_hidden_layers)
    planned, rows, start = _samples_of(meta, set(pick), lm.tokenizer), {}, time.time()
    for i, sid in enumerate(pick):
        sample = realize(planned[sid], lm.tokenizer)
        ids = prompt_ids(lm.tokenizer, sample, meta["identity"]["data"]["chat_template"])
        per = {}
        plan = SparsePlan(levels=None, selection=sparse.selection(), dense_layers=frozenset(layers), backend="reference",
                          probe_layers=frozenset(layers), probe_window=sparse.probe_window,
                          on_probe=lambda layer, st: per.__setitem__(layer, [float(st[s][0]) for s in PROBE_STATS]))
        with torch.no_grad(), use_plan(plan):
            lm.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        rows[sid] = [per[layer] for layer in layers]
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(pick)} {time.time() - start:.0f}s", flush=True)
    json.dump({"stats": list(PROBE_STATS), "store": root, "rows": rows}, open(out, "w"))


LEVELS = {1: "50", 3: "80", 5: "90", 7: "95"}   # grid index -> level in the recall feature names


def _held_out_auc(x, lab, fam, families) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    out = {}
    for f in families:
        m, aucs = fam == f, []
        for li in LEVELS:
            y = lab >= li
            if 0 < y[m].mean() < 1 and 0 < y[~m].mean() < 1:
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x[~m], y[~m])
                aucs.append(roc_auc_score(y[m], clf.predict_proba(x[m])[:, 1]))
        out[f] = float(np.mean(aucs)) if aucs else None
    return out


def _within_auc(x, stats, lab, fam, families) -> dict:
    from sklearn.metrics import roc_auc_score
    out = {}
    for f in families:
        m = fam == f
        aucs = [roc_auc_score(lab[m] >= li, x[m, stats.index(f"recall{lv}_mean")]) for li, lv in LEVELS.items()
                if 0 < (lab[m] >= li).mean() < 1]
        out[f] = float(np.mean(aucs)) if aucs else None
    return out


def analyse(path: str, out: str) -> None:
    from controller.learning.config import ControllerJobConfig
    from controller.learning.dataset import arrays_from_store
    from controller.experiments.holdout import FAMILIES
    from data.config import load_config
    from data.features import FEATURE_NAMES
    warnings.filterwarnings("ignore")
    d = json.load(open(path))
    stats = d["stats"]
    job = load_config(ControllerJobConfig, "configs/demo_smollm2.yaml", ["criterion.name=fidelity", "logging.wandb=disabled"])
    a, _ = arrays_from_store(job.labels, job.criterion)
    pos = {s: i for i, s in enumerate(a.sample_ids)}
    sids = [s for s in d["rows"] if s in pos]
    idx = np.array([pos[s] for s in sids])
    probes = np.array([d["rows"][s] for s in sids])            # [n, layers, stats]
    lab, loglen = a.label_index[idx], a.features[idx, FEATURE_NAMES.index("log_length")]
    fam = np.array([next(f for f, ts in FAMILIES.items() if t in ts) for t in a.tasks[idx]])
    stored = a.features[idx][:, [FEATURE_NAMES.index(f"probe_{s}") for s in stats]]
    variants = {"layers 0-1 (shipped)": probes[:, :2].mean(1), **{f"layer {i}": probes[:, i] for i in range(probes.shape[1])}}
    rows = {name: {"held_out": _held_out_auc(np.column_stack([x, loglen]), lab, fam, FAMILIES),
                   "within_recall": _within_auc(x, stats, lab, fam, FAMILIES)} for name, x in variants.items()}
    result = {"requests": len(sids), "per_family": {f: int((fam == f).sum()) for f in FAMILIES},
              "max_abs_diff_layers01_vs_stored": float(np.abs(probes[:, :2].mean(1) - stored).max()), "rows": rows}
    json.dump(result, open(out, "w"), indent=1)
    for name, r in rows.items():
        held = [v for v in r["held_out"].values() if v is not None]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["held_out"].values()) + f" | {np.mean(held):.2f} | "
              + " | ".join(f"{v:.2f}" for v in r["within_recall"].values()) + " |")


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from output_error_study import analyse_output_error, collect_output_error   # noqa: E402 (beside this file)
    commands = {"collect": lambda a: collect(a[0], a[1], int(a[2]), int(a[3])), "analyse": lambda a: analyse(*a),
                "collect-output-error": lambda a: collect_output_error(*a), "analyse-output-error": lambda a: analyse_output_error(*a)}
    commands[sys.argv[1]](sys.argv[2:])
