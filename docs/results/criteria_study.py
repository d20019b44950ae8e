"""Which criterion measures the model and not decoding noise: the validation table of issue 27.

Input: two label stores of the same plan and model, labeled under different batch shapes (store A
with the noise floor, `labeling.null_share: 1.0`; store B relabeled with another
`labeling.batch_samples`), and optionally a checkpoint whose P(safe) is ranked against each
criterion's labels. Output: `criteria.json` (`rows`: one per criterion and model, `default`) and a
markdown view beside it.

  python docs/results/criteria_study.py --pair smollm2-135m A B runs/demo/checkpoint \
      --pair gemma3-270m A2 B2 checkpoints/gemma3-270m/checkpoint --out docs/results/criteria.json

Per criterion: `relabel_flip` (share of requests whose label differs between A and B),
`dense_null_unsafe` (share of dense-vs-dense pairs judged unsafe; for divergence the threshold
comes from the other half of the null, cross-fitted, so the number is out of sample),
`gold_agreement` (label equal to the gold label, on requests whose dense answer scores 1),
`oracle_saving` (attention compute the labels allow, store A), `auc` (mean ROC AUC of the
checkpoint's P(safe) per level against these labels), `threshold` (divergence: from A's null).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.learning.dataset import arrays_from_frame  # noqa: E402
from controller.learning.evaluate import policy_metrics, separability  # noqa: E402
from data.criteria import MEASURES, apply_criterion, criterion_dict, floor_quantile, null_threshold, null_values  # noqa: E402
from data.store import LabelStore, sample_labels, write_text_atomic  # noqa: E402

GOALS = {"relabel_flip": 0.03, "dense_null_unsafe": 0.01, "gold_agreement": 0.9}
# a default may not be more lenient than the task's own truth: on requests whose dense answer scores 1,
# at most this share may be labeled above the gold level (a level whose answer gold scores wrong)
ABOVE_GOLD_MAX = 0.05


def criteria(table, quantiles=(0.99, 0.999, 1.0)) -> dict[str, dict]:
    out = {"gold": {"name": "gold"}, "fidelity": {"name": "fidelity"}}
    for measure in MEASURES:
        for q in quantiles:
            out[f"divergence:{measure}@{q:g}"] = {"name": "divergence", "measure": measure, "null_quantile": q}
    return out


def cross_fit_null_unsafe(table, crit: dict) -> float:
    """Share of null pairs outside the threshold set on the other half of the null."""
    values = null_values(table, crit["measure"])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(values))
    halves = values[order[: len(values) // 2]], values[order[len(values) // 2:]]
    sign = MEASURES[crit["measure"]]
    bad = []
    for fit, test in (halves, halves[::-1]):
        t = floor_quantile(fit, crit["measure"], crit["null_quantile"])
        bad.append(np.mean(test > t) if sign > 0 else np.mean(test < t))
    return float(np.mean(bad))


def null_unsafe(table, crit: dict) -> float | None:
    """None where the store's floor has no alone answers (`labeling.null_answers: false`)."""
    dense = table[table["level"] == 0.0].set_index("sample_id")
    has = dense["null_same_answer"].notna()
    d = dense[has]
    if crit["name"] in ("fidelity", "gold") and not len(d):
        return None
    if crit["name"] == "fidelity":
        return float(((d["null_same_answer"] < 1) | (d["null_nll_rise"] > crit["tau"])).mean())
    if crit["name"] == "gold":
        g = d[d["score"].notna()]
        return float((g["null_score"] < g["score"] - 1e-9).mean())
    return cross_fit_null_unsafe(table, crit)


def labels(table, crit: dict):
    judged = apply_criterion(table, crit)
    return judged, sample_labels(judged).set_index("sample_id")["label"]


def row_for(name: str, crit: dict, a, b, net, model: str) -> dict:
    crit = criterion_dict(crit)
    if crit["name"] == "divergence":
        crit["threshold"] = null_threshold(a, crit["measure"], crit["null_quantile"])   # as calibrate.py sets it
    judged_a, la = labels(a, crit)
    _, lb = labels(b, crit)
    _, gold = labels(a, {"name": "gold"})
    common = la.index.intersection(lb.index)
    dense = a[a["level"] == 0.0].set_index("sample_id")["score"]
    solved = dense[dense == 1].index
    arrays = arrays_from_frame(judged_a)
    row = {"criterion": name, "model": model, "requests": int(len(la)), "relabel_pairs": int(len(common)),
           "relabel_flip": float((la[common] != lb[common]).mean()), "dense_null_unsafe": null_unsafe(a, crit),
           "gold_agreement": float((la[solved] == gold[solved]).mean()) if len(solved) else None,
           "gold_agreement_requests": int(len(solved)),
           # where it disagrees with gold on solved requests: below gold (stricter: saves less) or above
           # (more lenient: allows a level whose answer gold scores wrong)
           "below_gold": float((la[solved] < gold[solved]).mean()) if len(solved) else None,
           "above_gold": float((la[solved] > gold[solved]).mean()) if len(solved) else None,
           "oracle_saving": policy_metrics(arrays, arrays.label_index)["compute_saved"],
           "threshold": crit.get("threshold"), "mean_label": float(la.mean()),
           # dense-vs-dense pairs: cross-fitted on halves of m, a threshold at the top of one half is
           # exceeded by about 1/(m/2 + 1) of the other half, the finest dense_null_unsafe it can show
           "null_pairs": int(len(null_values(a, crit.get("measure", "kl_max"))))}
    if net is not None:
        from controller.runtime.policy import LearnedPolicy
        aucs = [v for v in separability(LearnedPolicy(net), arrays).values() if v is not None]
        row["auc"] = float(np.mean(aucs)) if aucs else None
    row["met"] = [k for k, g in GOALS.items() if row[k] is not None and (row[k] <= g if k != "gold_agreement" else row[k] >= g)]
    row["goals_met"] = len(row["met"])
    return row


def markdown(doc: dict) -> str:
    head = ("| criterion | model | relabel_flip | dense_null_unsafe | gold_agreement | below / above gold | "
            "oracle_saving | auc | threshold |")
    lines = ["# Criteria: do labels measure the model or decoding noise?", "", doc["how"], "",
             f"Default for `calibrate.py`: **{doc['default']}** (among the label-free criteria never above gold on more than "
             f"{ABOVE_GOLD_MAX:.0%} of solved requests, the one meeting most goals over both models, then agreeing most with gold, then saving most; goals it misses: {', '.join(doc['default_goals_missed']) or 'none'}). Goals: relabel_flip "
             "<= 0.03, dense_null_unsafe <= 0.01, gold_agreement >= 0.9. Below / above gold: of the requests whose dense "
             "answer scores 1, the share labeled below gold's level (stricter) and above it (more lenient).", "",
             head, "|---" * 9 + "|"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in doc["rows"]:
        lines.append(f"| {r['criterion']} | {r['model']} | {fmt(r['relabel_flip'])} | {fmt(r['dense_null_unsafe'])} | "
                     f"{fmt(r['gold_agreement'])} | {fmt(r.get('below_gold'))} / {fmt(r.get('above_gold'))} | {fmt(r['oracle_saving'])} | {fmt(r.get('auc'))} | {fmt(r['threshold'])} |")
    return "\n".join(lines) + "\n"


def pick_default(rows: list[dict]) -> dict:
    """Among the label-free criteria never more lenient than gold (above_gold <= ABOVE_GOLD_MAX on
    every model), the one meeting most goals over every model, then agreeing most with gold, then
    saving most (means over models)."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        if r["criterion"] != "gold":
            by_name.setdefault(r["criterion"], []).append(r)
    safe = {n: rs for n, rs in by_name.items() if all((r["above_gold"] or 0.0) <= ABOVE_GOLD_MAX for r in rs)}
    by_name = safe or by_name
    key = lambda rs: (sum(r["goals_met"] for r in rs), float(np.mean([r["gold_agreement"] or 0.0 for r in rs])),  # noqa: E731
                      float(np.mean([r["oracle_saving"] for r in rs])))
    name = max(by_name, key=lambda n: key(by_name[n]))
    missed = sorted({k for r in by_name[name] for k in GOALS if k not in r["met"]}, key=list(GOALS).index)
    return {"default": name, "default_goals_missed": missed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", nargs="+", action="append", required=True, metavar="MODEL A B [CHECKPOINT]",
                   help="a model's two stores of one plan (and a checkpoint for the AUC); repeat per model")
    p.add_argument("--how", default="", help="cards, commands and versions, for the markdown view")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows, stores = [], {}
    for pair in args.pair:
        if len(pair) not in (3, 4):
            p.error("--pair takes MODEL A B [CHECKPOINT]")
        model, a_root, b_root = pair[:3]
        a, b = LabelStore(a_root).table(), LabelStore(b_root).table()
        net = None
        if len(pair) == 4:
            from controller.runtime.checkpoint import load_checkpoint
            net = load_checkpoint(pair[3]).net
        rows += [row_for(name, crit, a, b, net, model) for name, crit in criteria(a).items()]
        stores[model] = {"a": LabelStore(a_root).meta().get("device_name"), "b": LabelStore(b_root).meta().get("device_name")}
    doc = {**pick_default(rows), "goals": GOALS, "rows": rows, "how": args.how, "stores": stores}
    out = Path(args.out)
    write_text_atomic(out, json.dumps(doc, indent=1))
    write_text_atomic(out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
