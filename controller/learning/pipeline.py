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
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig, LabelingConfig, LabelJobConfig, ModelConfig, SparseConfig, CriterionConfig
from data.errors import UserError
from data.models import same_weights
from data.features import FEATURE_NAMES, FEATURE_VERSION
from data.store import criterion_dict, describe_criterion

from controller.guarantee.calibrate import calibrate
from controller.learning.config import ControllerJobConfig
from controller.guarantee.arrays import LabelArrays
from controller.learning.dataset import MissingOutputs, arrays_from_store, requests_summary, split_groups, store_hash
from controller.learning.timing import TimeTable, find_timings
from controller.learning.evaluate import alpha_sweep, best_in_hindsight, evaluate_all, reliability, separability
from controller.runtime.checkpoint import ControllerCheckpoint, export_checkpoint, load_checkpoint
from controller.guarantee.guard import Monitored, ShiftGuard, monitor_stream, exchangeability_words, two_sample_test
from controller.learning.lit import LabelDataModule, fit_net
from controller.runtime.policy import (ComputeAware, LearnedPolicy, MassCoveragePolicy, Policy, Named, controller_policy, deployed_policy, recall_columns)
from controller.learning.baselines import FixedPolicy, LengthLawPolicy, SklearnPolicy
from controller.learning.report import why_short, write_report


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


def resolve_labels(job: ControllerJobConfig) -> str | None:
    """The label store to train on: `job.labels` if set (checked), else labeling into labeling.out
    (None on the non-zero ranks of a distributed labeling run: rank 0 trains)."""
    if job.labels is not None:
        from data.store import LabelStore
        if not Path(job.labels).is_dir():
            raise UserError(f"label store {job.labels} does not exist; fix `labels` or set it to null to label anew")
        _check_reuse(LabelStore(job.labels).meta(), job, job.labels)
        return job.labels
    from data.runner import run_labeling
    store = run_labeling(job.label_job())
    return None if store is None else str(store.root)


def build_policies(net, train: LabelArrays, seed: int, rule: str, guard: ShiftGuard | None = None,
                   deployed: Policy | None = None) -> list[Policy]:
    """The controller first (behind its shift guard and stream monitor, as the hook runs it), then its variants and the
    baselines; every P(safe) policy decides with the same rule, so the comparison is of predictors,
    not of decision rules. Only the controller is guarded."""
    levels = train.levels
    same_rule = (lambda p: ComputeAware(p, levels, p.name)) if rule == "compute_aware" else (lambda p: p)
    controller = Named(deployed, "controller") if deployed is not None else controller_policy(net, levels, rule)
    policies = [controller] if guard is None else [
        Monitored(controller, guard, levels, "controller"), Named(controller, "controller_unguarded")]
    policies += [controller_policy(net, levels, rule, hide_task=True, name="controller_unknown_task")]
    if rule == "compute_aware":
        policies.append(controller_policy(net, levels, "threshold", name="controller_plain_threshold"))
    mass = [MassCoveragePolicy(levels)] if recall_columns(levels) is not None else []
    return policies + [same_rule(SklearnPolicy("logistic", seed).fit(train)), same_rule(SklearnPolicy("gbm", seed).fit(train)),
                       *mass, FixedPolicy(levels), LengthLawPolicy(levels).fit(train)]


def _splits(arrays: LabelArrays, split: dict) -> dict[str, np.ndarray]:
    return split_groups(arrays.groups, (split["train"], split["val"], split["calibration"]), split["seed"])


def fit_guard(net, cal: LabelArrays, calibration: dict, ignore_task: bool) -> ShiftGuard:
    """The shift guard of a checkpoint calibrated on `cal` (settings from a CalibrationConfig dict)."""
    if not np.isclose(cal.levels, calibration["fallback"]).any():
        raise UserError(f"calibration.fallback {calibration['fallback']} is not a grid level {list(cal.levels)}")
    return ShiftGuard.fit(cal.features, cal.n_tokens, net.feature_mean.numpy(), net.feature_std.numpy(),
                          calibration["guard_k"], calibration["guard_p"], calibration["fallback"],
                          ignore_task=ignore_task, warmup=calibration.get("guard_warmup", 0))


def path_from(target: str | Path, checkpoint_dir: str | Path) -> str:
    """`target` relative to a checkpoint folder (recorded beside the path as given, so a checkpoint
    moved together with its stores still finds them)."""
    return os.path.relpath(Path(target).resolve(), Path(checkpoint_dir).resolve())


def find_store(path: str, from_checkpoint: str | None, checkpoint_dir: str | Path | None, what: str) -> str:
    """A store a checkpoint names: at its recorded path, else relative to the checkpoint folder."""
    if Path(path).is_dir():
        return path
    if from_checkpoint and checkpoint_dir is not None and (Path(checkpoint_dir) / from_checkpoint).is_dir():
        return str(Path(checkpoint_dir) / from_checkpoint)
    where = f" or {Path(checkpoint_dir) / from_checkpoint}" if from_checkpoint and checkpoint_dir is not None else ""
    raise UserError(f"the checkpoint's {what} label store is missing (looked at {path}{where}); "
                    "put the store back at one of those paths")


def recorded_stores(rec: dict, checkpoint_dir: str | Path) -> dict[str, str]:
    """{description: path} of the label stores a checkpoint record names that exist here (outputs
    must keep clear of them)."""
    cal = rec.get("calibration_data") or {}
    entries = {"the checkpoint's training label store": rec.get("label_store") or {},
               "the checkpoint's calibration label store": {"path": cal.get("label_store"),
                                                            "path_from_checkpoint": cal.get("label_store_from_checkpoint")}}
    found = {}
    for what, entry in entries.items():
        rel = entry.get("path_from_checkpoint")
        for path in (entry.get("path"), str(Path(checkpoint_dir) / rel) if isinstance(rel, str) else None):
            if isinstance(path, str) and Path(path).is_dir():
                found[what] = path
                break
    return found


def check_report_paths(out: str, checkpoint: str, overwrite: bool, **inputs: str | None) -> None:
    """eval.py's --out, before anything is written: new, empty or a report of ours (replaced only
    with --overwrite), clear of the input checkpoint, its stores and the evaluated inputs."""
    from data.errors import check_output_folder
    from data.outputs import check_disjoint, check_not_here, check_report_target
    check_not_here(out, f"--out {out}")
    check_output_folder(out, f"--out {out}")   # a file, under a file, unwritable: said first
    rec = load_checkpoint(checkpoint).record
    others = {"the input checkpoint": checkpoint, **recorded_stores(rec, checkpoint),
              **{f"the --{k} input": v for k, v in inputs.items()}}
    check_disjoint(out, f"--out {out}", others)
    check_report_target(out, f"--out {out}", overwrite)


def calibration_data(source: str, cal: LabelArrays, criterion: dict, store: str, checkpoint_dir: Path,
                     files: list | None = None) -> dict:
    """What a checkpoint's guarantee was calibrated on, for its record and reports."""
    return {"source": source, "label_store": store, "label_store_from_checkpoint": path_from(store, checkpoint_dir),
            "label_store_sha256": store_hash(store), "files": files or [], **requests_summary(cal, criterion)}


def make_record(job: ControllerJobConfig, meta: dict, labels: str, net, cal, info: dict, arrays: LabelArrays,
                guard: ShiftGuard, cal_data: dict, checkpoint_dir: Path) -> dict:
    from data.labeling import _git_sha
    return {"guard": guard.to_json(), "calibration_data": cal_data,
        "feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES),
        "normalisation": {"mean": net.feature_mean.tolist(), "std": net.feature_std.tolist()},
        "grid": [float(x) for x in arrays.levels], "sparse": meta["identity"]["sparse"],
        "calibration": cal.to_json(), "alpha": cal.alpha, "delta": cal.delta,
        "model": {"name": meta.get("model_name"), "fingerprint": meta["identity"]["model"]},
        "label_store": {"path": labels, "path_from_checkpoint": path_from(labels, checkpoint_dir),
                        "sha256": store_hash(labels), "samples": len(arrays)},
        "criterion": criterion_dict(job.criterion), "split": asdict(job.split), "sweep": list(job.calibration.sweep), "decision": job.calibration.decision,
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
    return train_on_arrays(job, arrays, meta, labels)


def checked_splits(job: ControllerJobConfig, arrays: LabelArrays, labels: str) -> dict:
    """The train/val/calibration/test splits, or a UserError (before anything is written) when a
    split is empty or calibration has fewer than the 2 requests the shift guard needs."""
    splits = _splits(arrays, asdict(job.split))
    if min(len(v) for v in splits.values()) == 0 or len(splits["calibration"]) < 2:
        raise UserError(f"label store {labels} has {len(arrays)} samples: too few for train/val/calibration/test "
                        f"splits ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}; calibration needs >= 2); "
                        "label more samples")
    return splits


def train_on_arrays(job: ControllerJobConfig, arrays: LabelArrays, meta: dict, labels: str) -> Trained:
    """Split `arrays` (rows of the store `labels`) -> train -> calibrate -> fit the guard -> export."""
    splits = checked_splits(job, arrays, labels)
    out = Path(job.out)
    net, info = fit_net(job, LabelDataModule(arrays, splits, job.train.batch_size, job.train.seed), str(out))
    policy = controller_policy(net, arrays.levels, job.calibration.decision, hide_task=job.train.task_dropout >= 1.0)
    cal_arrays = arrays.subset(splits["calibration"])
    cal = calibrate(policy, cal_arrays, job.calibration.alpha, job.calibration.delta, job.calibration.length_strata,
                    job.calibration.mode)
    if not cal.passed:
        print(f"warning: no threshold passes Learn-then-Test at alpha={cal.alpha}, delta={cal.delta} on "
              f"{cal.n} calibration requests; the controller falls back to dense for every request")
    guard = fit_guard(net, cal_arrays, asdict(job.calibration), ignore_task=job.train.task_dropout >= 1.0)
    ckpt_dir = out / "checkpoint"
    cal_data = calibration_data(f"calibration split of label store {labels}", cal_arrays, criterion_dict(job.criterion),
                                labels, ckpt_dir)
    path = export_checkpoint(ckpt_dir, net, make_record(job, meta, labels, net, cal, info, arrays, guard, cal_data, ckpt_dir))
    return Trained(path, net, cal)


def check_same_model(lm, ckpt: ControllerCheckpoint, name: str) -> None:
    """UserError unless the loaded model `lm` (named `name`) has the weights the controller was trained for."""
    if not same_weights(lm.fingerprint, ckpt.fingerprint):
        raise UserError(f"model {name} ({lm.fingerprint['id']}) is not the model the controller was trained "
                        f"for ({ckpt.record['model']['name']}, {ckpt.fingerprint['id']}); use that model's checkpoint "
                        "or train one for this model")


def label_requests(ckpt: ControllerCheckpoint, data: DataConfig, out: Path, criterion: dict, devices: int = 1,
                   batch_samples: int = 8, progress: bool = False, model: str | None = None,
                   null_share: float = 0.0) -> str:
    """Label requests with the checkpoint's model (or `model`, which must have the same weights),
    sparse settings and grid into `out` (resumable). A model whose fingerprint differs from the
    checkpoint's is refused before anything is written."""
    from data.runner import load_for_labeling, run_labeling
    rec = ckpt.record
    job = LabelJobConfig(model=ModelConfig(name=model or rec["model"]["name"]), sparse=SparseConfig(**rec["sparse"]),
                         data=data, criterion=CriterionConfig(**criterion),
                         labeling=LabelingConfig(grid=tuple(rec["grid"]), out=str(out), progress=progress,
                                                 devices=devices, batch_samples=batch_samples, null_share=null_share,
                                                 null_answers=False))   # the divergence floor needs no alone decode
    lm = load_for_labeling(job)
    check_same_model(lm, ckpt, job.model.name)
    store = run_labeling(job, lm)
    return "" if store is None else str(store.root)   # "": a non-zero rank of a distributed run


def calibration_arrays(rec: dict, criterion: dict, checkpoint_dir: str | Path | None = None
                       ) -> tuple[LabelArrays, LabelArrays, str]:
    """(training split, calibration requests, where they come from) of a checkpoint: the requests it
    was last calibrated on (its own store's calibration split, or a recalibration's label store).
    Calibration requests that `criterion` cannot judge (gold on prompts without answers) are judged
    by the checkpoint's own criterion, as it was calibrated; `where` then says so."""
    recorded = rec["label_store"]["path"]
    train_root = find_store(recorded, rec["label_store"].get("path_from_checkpoint"), checkpoint_dir, "training")
    arrays, _ = arrays_from_store(train_root, criterion)
    splits = _splits(arrays, rec["split"])
    train, cal = arrays.subset(splits["train"]), arrays.subset(splits["calibration"])
    data = rec.get("calibration_data", {})
    if data.get("label_store") and data["label_store"] != recorded:
        cal_root = find_store(data["label_store"], data.get("label_store_from_checkpoint"), checkpoint_dir, "calibration")
        try:
            cal = arrays_from_store(cal_root, criterion)[0]
        except MissingOutputs:
            own = criterion_dict(rec["criterion"])
            cal = arrays_from_store(cal_root, own)[0]
            return train, cal, (f"{data.get('source', cal_root)}; the baselines are calibrated under the checkpoint's own "
                                f"criterion {describe_criterion(own)}, as those requests have no reference outputs")
    return train, cal, data.get("source", f"calibration split of label store {train_root}")


def evaluated_arrays(ckpt: ControllerCheckpoint, out: Path, criterion: dict, labels: str | None,
                     ruler: str | None, prompts: str | None) -> tuple[LabelArrays, str]:
    if ruler is not None or prompts is not None:
        data = DataConfig(tasks=(), ruler=(ruler,) if ruler else (), prompts=(prompts,) if prompts else ())
        root = label_requests(ckpt, data, out / "labels", criterion, progress=sys.stderr.isatty())   # bars on a terminal
        return arrays_from_store(root, criterion)[0], f"{'RULER files ' + ruler if ruler else 'prompts ' + prompts} (all requests)"
    store_arrays, meta = arrays_from_store(labels, criterion)
    ident, rec = meta["identity"], ckpt.record
    if not same_weights(ident["model"], ckpt.fingerprint):
        raise UserError(f"label store {labels} was labeled with model {ident['model'].get('id')}, the checkpoint "
                        f"with {ckpt.fingerprint.get('id')}; evaluate it on a store of its own model")
    if ident.get("sparse") != rec["sparse"] or [float(x) for x in ident.get("levels", [])] != [float(x) for x in rec["grid"]]:
        raise UserError(f"label store {labels} was made with other sparse settings or grid than checkpoint "
                        f"{rec.get('label_store', {}).get('path', '?')}'s; evaluate it on a store made like its own")
    return store_arrays.subset(_splits(store_arrays, ckpt.record["split"])["test"]), f"label store {labels}, test split"


def shift_report(ckpt: ControllerCheckpoint, test: LabelArrays) -> dict:
    """Share of evaluated requests the guard flags, and a two-sample test against the calibration requests."""
    guard = ckpt.guard
    if guard is None:
        return {"words": "This checkpoint has no shift guard (written before guards existed); retrain or recalibrate it."}
    flagged, p, _ = guard.check(test.features)
    two = two_sample_test(guard.reference, guard.standardise(test.features))
    mon = monitor_stream(guard, test.features)[1]
    stream = (f" The stream monitor (these requests in a seeded random order) alarmed at request {mon['alarm_at']} of "
              f"{mon['seen']}: from there on every request ran at the fallback level." if mon["alarm_at"] else
              f" The stream monitor (these requests in a seeded random order) did not alarm over {mon['seen']} requests "
              f"(its martingale peaked at {mon['peak']:.3g} of the {mon['threshold']:g} that would alarm; "
              f"{len(mon['window_p_values'])} windows of {mon['window']} requests tested against the calibration "
              f"requests, smallest p = {min(mon['window_p_values'], default=float('nan')):.2g}).")
    if mon.get("warmup"):
        stream += (f" Its first {min(mon['warmup'], mon['seen'])} requests ran at the fallback level on probation "
                   f"(calibration.guard_warmup = {mon['warmup']}), as every stream's do in the hook.")
    return {"flagged_share": float(flagged.mean()), "median_p_value": float(np.median(p)), "two_sample": two,
            "monitor": mon, "covered": guard.describe(), "words": exchangeability_words(two, float(flagged.mean())) + stream}


def time_table(timings: str | None, model_fp: dict) -> TimeTable | None:
    """The benchmark timings that price decisions in milliseconds: `timings` (a bench JSON), else
    the newest one recorded for this model's weights; None when there is none."""
    path = timings or find_timings(model_fp)
    if path is None:
        return None
    try:
        return TimeTable.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--timings {path}: not a benchmark JSON with end_to_end dense and forced rows ({e}); "
                        "write one with python -m controller.benchmark") from None


def evaluate_checkpoint(checkpoint: str, out: str, labels: str | None = None, ruler: str | None = None,
                        prompts: str | None = None, criterion: str | None = None, timings: str | None = None) -> Path:
    """Every policy, calibrated on the checkpoint's calibration requests, evaluated on `labels`' test
    split or on every request of `ruler` / `prompts` (labeled here with the checkpoint's settings);
    violations judged by `criterion` (default: the checkpoint's); time saved priced by `timings`."""
    ckpt = load_checkpoint(checkpoint)
    times = time_table(timings, ckpt.record["model"]["fingerprint"])
    rec, out_dir = ckpt.record, Path(out)
    crit = criterion_dict(rec["criterion"])
    if criterion is not None:
        crit["name"] = criterion
    train, cal, cal_source = calibration_arrays(rec, crit, Path(checkpoint))
    test, where = evaluated_arrays(ckpt, out_dir, crit, labels, ruler, prompts)
    policies = build_policies(ckpt.net, train, rec["split"]["seed"], rec["decision"], ckpt.guard,
                              deployed_policy(ckpt.net, ckpt.levels, rec))
    alpha, delta = rec["alpha"], rec["delta"]
    deployed = ("controller", "controller_unguarded")   # the checkpoint's own threshold
    edges = ckpt.calibration.edges   # every policy calibrated as the deployed one: one threshold, or one per stratum
    mode = ckpt.calibration.mode
    cals = {p.name: ckpt.calibration if p.name in deployed else calibrate(p, cal, alpha, delta, edges, mode) for p in policies}
    metrics = {"alpha": alpha, "delta": delta, "calibration_mode": mode, "n": len(test), "deployed_policy": rec.get("policy", "controller"), "n_calibration": len(cal), "evaluated_on": where,
               "criterion": crit, "criterion_text": describe_criterion(crit),
               "checkpoint_criterion_text": describe_criterion(rec["criterion"]), "calibrated_on": cal_source,
               "shift": shift_report(ckpt, test), "policies": evaluate_all(policies, cals, test, times),
               "timings": None if times is None else {"device": times.device, "source": times.source,
                                                      "lengths": times.lengths.tolist(), "levels": list(times.levels)},
               "alpha_sweep": alpha_sweep(policies, cal, test, [*rec.get("sweep", []), alpha], delta, edges, mode),
               "reliability": reliability(LearnedPolicy(ckpt.net), test),
               "provenance": {"checkpoint": str(checkpoint), "model": rec["model"], "label_store": rec["label_store"],
                              "calibration_data": {k: v for k, v in rec.get("calibration_data", {}).items()},
                              "sparse": rec["sparse"], "grid": rec["grid"], "versions": versions()}}
    metrics["diagnostics"] = {"best_in_hindsight": {p.name: best_in_hindsight(p, test, alpha) for p in policies[:1]},
                               "auc_p_safe": separability(LearnedPolicy(ckpt.net), test)}
    metrics["why"] = why_short(metrics)
    header = (f"Model {rec['model']['name']} ({rec['model']['fingerprint']['id']}), {rec['sparse']['method']} "
              f"block {rec['sparse']['block_size']}, grid {rec['grid']}.")
    return write_report(out_dir, metrics, test, header)
