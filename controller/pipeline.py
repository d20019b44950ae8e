"""The controller job end to end, as functions the thin command lines call.

Owns `resolve_labels` (reuse the configured label store when its settings match the job, else
label), `train_controller` (train -> calibrate -> export; returns the checkpoint folder),
`evaluate_checkpoint` (every policy on a store's test split or on RULER files labeled on the fly,
written as a report) and the policy set every evaluation compares. Imports `data` and the
`controller` modules below it; `train.py` and `eval.py` import this.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig, LabelingConfig, LabelJobConfig, ModelConfig, SparseConfig, CriterionConfig
from data.errors import UserError
from data.features import FEATURE_NAMES, FEATURE_VERSION

from .calibrate import calibrate
from .config import ControllerJobConfig
from .dataset import LabelArrays, arrays_from_store, split_groups, store_hash
from .evaluate import alpha_sweep, best_in_hindsight, evaluate_all, reliability, separability
from .export import ControllerCheckpoint, export_checkpoint, load_checkpoint
from .lit import LabelDataModule, fit_net
from .policies import ComputeAware, LearnedPolicy, FixedPolicy, LengthLawPolicy, Policy, SklearnPolicy, controller_policy
from .report import why_short, write_report


def versions() -> dict:
    import lightning
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "lightning": lightning.__version__}
    try:
        import mapie
        out["mapie"] = mapie.__version__
    except ImportError:
        pass
    return out


def _check_reuse(meta: dict, job: ControllerJobConfig, root: str) -> None:
    ident = meta["identity"]
    if meta.get("model_name") != job.model.name:
        raise UserError(f"label store {root} was labeled for model {meta.get('model_name')!r}, the config names "
                        f"{job.model.name!r}; point `labels` at that model's store or set labels: null to label anew")
    want = {"sparse": asdict(job.sparse), "levels": list(job.labeling.levels)}
    have = {"sparse": ident.get("sparse"), "levels": ident.get("levels")}
    if json.loads(json.dumps(want)) != have:
        raise UserError(f"label store {root} was made with other sparse settings or grid than this config; "
                        "point `labels` at a matching store or set labels: null to label anew")


def resolve_labels(job: ControllerJobConfig) -> str:
    """The label store to train on: `job.labels` if set (checked), else labeling into labeling.out."""
    if job.labels is not None:
        from data.store import LabelStore
        if not Path(job.labels).is_dir():
            raise UserError(f"label store {job.labels} does not exist; fix `labels` or set it to null to label anew")
        _check_reuse(LabelStore(job.labels).meta(), job, job.labels)
        return job.labels
    from data.runner import run_labeling
    store = run_labeling(job.label_job())
    return str(store.root)


def build_policies(net, train: LabelArrays, seed: int, rule: str) -> list[Policy]:
    """The controller first, then its variants and the baselines; every P(safe) policy decides
    with the same rule, so the comparison is of predictors, not of decision rules."""
    levels = train.levels
    same_rule = (lambda p: ComputeAware(p, levels, p.name)) if rule == "compute_aware" else (lambda p: p)
    policies = [controller_policy(net, levels, rule),
                controller_policy(net, levels, rule, hide_task=True, name="controller_unknown_task")]
    if rule == "compute_aware":
        policies.append(controller_policy(net, levels, "threshold", name="controller_plain_threshold"))
    return policies + [same_rule(SklearnPolicy("logistic", seed).fit(train)), same_rule(SklearnPolicy("gbm", seed).fit(train)),
                       FixedPolicy(levels), LengthLawPolicy(levels).fit(train)]


def _splits(arrays: LabelArrays, split: dict) -> dict[str, np.ndarray]:
    return split_groups(arrays.groups, (split["train"], split["val"], split["calibration"]), split["seed"])


def make_record(job: ControllerJobConfig, meta: dict, labels: str, net, cal, info: dict, arrays: LabelArrays) -> dict:
    from data.labeling import _git_sha
    return {
        "feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES),
        "normalisation": {"mean": net.feature_mean.tolist(), "std": net.feature_std.tolist()},
        "grid": [float(x) for x in arrays.levels], "sparse": meta["identity"]["sparse"],
        "calibration": cal.to_json(), "alpha": cal.alpha, "delta": cal.delta,
        "model": {"name": meta.get("model_name"), "fingerprint": meta["identity"]["model"]},
        "label_store": {"path": labels, "sha256": store_hash(labels), "samples": len(arrays)},
        "criterion": asdict(job.criterion), "split": asdict(job.split), "sweep": list(job.calibration.sweep), "decision": job.calibration.decision,
        "net": {"n_features": len(FEATURE_NAMES), "n_sparse_levels": len(arrays.levels) - 1, **asdict(job.net)},
        "training": {**info, **asdict(job.train)}, "versions": versions(), "git_sha": _git_sha(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}


@dataclass
class Trained:
    checkpoint: Path
    net: object          # the in-memory SafetyNet
    calibration: object  # its Calibration


def train_controller(job: ControllerJobConfig) -> Trained:
    """Label (or reuse) -> train -> calibrate -> export."""
    labels = resolve_labels(job)
    arrays, meta = arrays_from_store(labels, job.criterion)
    splits = _splits(arrays, asdict(job.split))
    if min(len(v) for v in splits.values()) == 0:
        raise UserError(f"label store {labels} has {len(arrays)} samples: too few for train/val/calibration/test splits")
    out = Path(job.out)
    net, info = fit_net(job, LabelDataModule(arrays, splits, job.train.batch_size, job.train.seed), str(out))
    policy = controller_policy(net, arrays.levels, job.calibration.decision)
    cal = calibrate(policy, arrays.subset(splits["calibration"]), job.calibration.alpha, job.calibration.delta)
    if not cal.passed:
        print(f"warning: no threshold passes Learn-then-Test at alpha={cal.alpha}, delta={cal.delta} on "
              f"{cal.n} calibration requests; the controller falls back to dense for every request")
    path = export_checkpoint(out / "checkpoint", net, make_record(job, meta, labels, net, cal, info, arrays))
    return Trained(path, net, cal)


def _label_ruler(ckpt: ControllerCheckpoint, ruler: str, out: Path) -> str:
    from data.runner import run_labeling
    rec = ckpt.record
    job = LabelJobConfig(model=ModelConfig(name=rec["model"]["name"]), sparse=SparseConfig(**rec["sparse"]),
                         data=DataConfig(tasks=(), ruler=(ruler,)), criterion=CriterionConfig(**rec["criterion"]),
                         labeling=LabelingConfig(grid=tuple(rec["grid"]), out=str(out / "labels"), progress=False))
    store = run_labeling(job)
    if store.meta()["identity"]["model"]["id"] != ckpt.fingerprint["id"]:
        raise UserError(f"model {rec['model']['name']} here is not the model the controller was trained for "
                        f"({ckpt.fingerprint['id']}); evaluate where that model is available")
    return str(store.root)


def evaluate_checkpoint(checkpoint: str, out: str, labels: str | None = None, ruler: str | None = None) -> Path:
    """Every policy, calibrated on the checkpoint's calibration split, evaluated on `labels`' test
    split or on every request of `ruler` (labeled here with the checkpoint's settings)."""
    ckpt = load_checkpoint(checkpoint)
    rec, out_dir = ckpt.record, Path(out)
    train_root = rec["label_store"]["path"]
    if not Path(train_root).is_dir():
        raise UserError(f"the checkpoint's training label store {train_root} is missing; baselines are fitted on it")
    arrays, _ = arrays_from_store(train_root, rec["criterion"])
    splits = _splits(arrays, rec["split"])
    train, cal = arrays.subset(splits["train"]), arrays.subset(splits["calibration"])
    if ruler is not None:
        test = arrays_from_store(_label_ruler(ckpt, ruler, out_dir), rec["criterion"])[0]
        where = f"RULER files {ruler} (all requests)"
    else:
        store_arrays, _ = arrays_from_store(labels, rec["criterion"])
        test = store_arrays.subset(_splits(store_arrays, rec["split"])["test"])
        where = f"label store {labels}, test split"
    policies = build_policies(ckpt.net, train, rec["split"]["seed"], rec["decision"])
    alpha, delta = rec["alpha"], rec["delta"]
    cals = {p.name: calibrate(p, cal, alpha, delta) for p in policies[1:]}
    cals["controller"] = ckpt.calibration
    metrics = {"alpha": alpha, "delta": delta, "n": len(test), "n_calibration": len(cal), "evaluated_on": where,
               "policies": evaluate_all(policies, cals, test),
               "alpha_sweep": alpha_sweep(policies, cal, test, [*rec.get("sweep", []), alpha], delta),
               "reliability": reliability(LearnedPolicy(ckpt.net), test),
               "provenance": {"checkpoint": str(checkpoint), "model": rec["model"], "label_store": rec["label_store"],
                              "sparse": rec["sparse"], "grid": rec["grid"], "versions": versions()}}
    metrics["diagnostics"] = {"best_in_hindsight": {p.name: best_in_hindsight(p, test, alpha) for p in policies[:1]},
                               "auc_p_safe": separability(LearnedPolicy(ckpt.net), test)}
    metrics["why"] = why_short(metrics)
    header = (f"Model {rec['model']['name']} ({rec['model']['fingerprint']['id']}), {rec['sparse']['method']} "
              f"block {rec['sparse']['block_size']}, grid {rec['grid']}.")
    return write_report(out_dir, metrics, test, header)
