"""How much of the oracle's saving can recalibration on 200 requests of a held-out family keep?

For each task family of a label store (leave-one-family-out, as `python -m controller.holdout`: the
controller trained on the other families, the family's requests with the task hidden, the same
seeded 200 calibration requests and the rest evaluated), per candidate policy:
- `hindsight`: the most any one threshold of the candidate saves on the evaluated requests while
  their violation rate stays <= alpha (tuned on the test requests themselves: an upper bound on
  what calibrating that candidate can reach, not a deployable number);
- `ltt`: Learn-then-Test on the 200 calibration requests at delta (one candidate), evaluated;
- `crc`: conformal risk control (expected rate <= alpha) on the same 200, evaluated.
And, as a ceiling on ranking within the family: a logistic model per level fitted on the family's
own labels (5-fold cross-fitted over all its requests; length alone, or every non-task feature),
under the same compute-aware rule, tuned in hindsight.

  python docs/results/recalibration_ceiling_study.py --out docs/results/recalibration_ceiling.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.experiments.holdout import FAMILIES, hide_task, in_group  # noqa: E402
from controller.guarantee.calibrate import calibrate  # noqa: E402
from controller.learning.evaluate import policy_metrics  # noqa: E402
from controller.runtime.policy import (TASK_COLUMNS, ComputeAware, MassCoveragePolicy, Policy,  # noqa: E402
                                       decide, deployed_policy, with_dense)
from data.features import FEATURE_NAMES  # noqa: E402


def hindsight(policy: Policy, ev, alpha: float) -> float:
    """The largest compute saved on `ev` by one threshold of `policy` at violation rate <= alpha."""
    s, best = policy.scores(ev.features), 0.0
    for lam in policy.lambdas:
        m = policy_metrics(ev, decide(s, lam))
        if m["violation_rate"] <= alpha:
            best = max(best, m["compute_saved"])
    return best


def certified(policy: Policy, cal, ev, alpha: float, delta: float, mode: str) -> dict:
    c = calibrate(policy, cal, alpha, delta, mode=mode)
    m = policy_metrics(ev, c.decide(policy.scores(ev.features), ev.n_tokens))
    return {"saving": m["compute_saved"], "unsafe": m["violation_rate"]}


class CrossFitted(Policy):
    """P(label >= k) per level from a logistic model on `columns`, fitted out of fold on the family itself."""
    name = "in_family"

    def __init__(self, arrays, columns: list[int], folds: int = 5):
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import KFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        x, k = arrays.features[:, columns].astype(np.float64), len(arrays.levels) - 1
        self.p = np.zeros((len(arrays), k))
        for train, test in KFold(folds, shuffle=True, random_state=0).split(x):
            for j in range(k):
                y = arrays.label_index[train] >= j + 1
                if y.all() or not y.any():
                    self.p[test, j] = y.mean()
                    continue
                model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x[train], y)
                self.p[test, j] = model.predict_proba(x[test])[:, 1]
        self.lambdas = np.round(np.linspace(1.0, 0.0, 201), 4)

    def scores(self, features: np.ndarray) -> np.ndarray:   # rows of the arrays it was built on, in order
        return with_dense(self.p)


def family_row(job, arrays, meta, labels: str, family: str, workdir: Path, alpha: float, delta: float) -> dict:
    from controller.learning.pipeline import train_on_arrays
    from controller.runtime.checkpoint import load_checkpoint
    held = in_group(arrays, "family", family)
    trained = train_on_arrays(dataclasses.replace(job, out=str(workdir / family)), arrays.subset(np.flatnonzero(~held)),
                              meta, labels)
    ckpt = load_checkpoint(trained.checkpoint)
    grp = hide_task(arrays.subset(np.flatnonzero(held)))
    order = np.random.default_rng(0).permutation(len(grp))
    cal, ev = grp.subset(order[:200]), grp.subset(order[200:])
    oracle = policy_metrics(ev, ev.label_index)["compute_saved"]
    rule = ckpt.record["decision"]
    candidates = {"controller": deployed_policy(ckpt.net, ckpt.levels, ckpt.record),
                  "mass_coverage": deployed_policy(ckpt.net, ckpt.levels, {**ckpt.record, "policy": "mass_coverage",
                                                                           "policy_decision": rule}),
                  "mass_coverage_threshold": MassCoveragePolicy(ckpt.levels)}
    row = {"family": family, "n_calibration": len(cal), "n_evaluated": len(ev), "oracle_saving": oracle,
           "decision_rule": rule, "candidates": {}}
    for name, policy in candidates.items():
        row["candidates"][name] = {"hindsight": hindsight(policy, ev, alpha),
                                   "ltt": certified(policy, cal, ev, alpha, delta, "ltt"),
                                   "crc": certified(policy, cal, ev, alpha, delta, "crc")}
    non_task = [i for i in range(len(FEATURE_NAMES)) if i not in TASK_COLUMNS]
    for name, cols in (("length_only", [FEATURE_NAMES.index("log_length")]), ("all_features", non_task)):
        fitted = CrossFitted(grp, cols)
        row[f"in_family_{name}_hindsight"] = hindsight(ComputeAware(fitted, grp.levels), grp, alpha)
        row[f"in_family_{name}_oracle"] = policy_metrics(grp, grp.label_index)["compute_saved"]
    return row


def table(rows: list[dict]) -> str:
    share = lambda x, o: f"{100 * x / o:.0f}%" if o > 0 else "-"  # noqa: E731
    lines = ["| family | oracle | controller: hindsight / LTT / CRC | mass coverage (rule): hindsight / LTT / CRC | "
             "in family, length only / all features (hindsight) |", "|---|---|---|---|---|"]
    for r in rows:
        o = r["oracle_saving"]
        cells = [" / ".join([share(c["hindsight"], o), share(c["ltt"]["saving"], o), share(c["crc"]["saving"], o)])
                 for c in (r["candidates"]["controller"], r["candidates"]["mass_coverage"])]
        fo = r["in_family_length_only_oracle"]
        lines.append(f"| {r['family']} | {100 * o:.1f}% | {cells[0]} | {cells[1]} | "
                     f"{share(r['in_family_length_only_hindsight'], fo)} / {share(r['in_family_all_features_hindsight'], fo)} |")
    return "\n".join(lines) + "\n\nShares of the oracle's compute saving on the same requests.\n"


def main() -> int:
    from controller.learning.config import ControllerJobConfig
    from controller.learning.dataset import arrays_from_stores
    from controller.learning.pipeline import versions
    from data.config import load_config
    from data.store import write_text_atomic
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_smollm2.yaml")
    ap.add_argument("--criterion", default="gold")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    job = load_config(ControllerJobConfig, args.config, [f"criterion.name={args.criterion}", "logging.wandb=disabled"])
    arrays, meta = arrays_from_stores([job.labels], job.criterion)
    a, d = job.calibration.alpha, job.calibration.delta
    with tempfile.TemporaryDirectory() as tmp:
        rows = [family_row(job, arrays, meta, job.labels, f, Path(tmp), a, d) for f in FAMILIES
                if in_group(arrays, "family", f).any()]
    doc = {"config": args.config, "criterion": args.criterion, "labels": job.labels, "alpha": a, "delta": d,
           "versions": versions(), "families": rows}
    write_text_atomic(Path(args.out), json.dumps(doc, indent=1))
    write_text_atomic(Path(args.out).with_suffix(".md"), table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
