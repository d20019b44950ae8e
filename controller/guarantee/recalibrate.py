"""Calibrating a trained controller on the user's own traffic, without answers.

Owns `min_requests` (the fewest requests with which Learn-then-Test can certify anything at
alpha, delta), `recalibrate` (Learn-then-Test of a checkpoint's policy on labeled requests, a new
shift guard fitted on them, the new record) and `recalibrate_checkpoint` (what `calibrate.py` runs:
check the inputs, label the prompts with the checkpoint's model, sparse settings and grid under a
criterion -- `divergence` (the default) and `fidelity` need no answers -- recalibrate, and export a new checkpoint whose record
names its calibration data: sha256 of the files, count, criterion, token range). The net is not
retrained: only the threshold and the guard change. Imports `data` and `controller` modules below it.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.errors import UserError, check_output_folder
from data.outputs import check_disjoint, check_not_here, check_replaceable, check_store_target
from data.criteria import LABEL_FREE_DEFAULT, criterion_dict, null_share_for, resolved
from data.tasks import read_prompts

from controller.guarantee.calibrate import Calibration, calibrate, ltt_p_values, threshold_text
from controller.guarantee.arrays import LabelArrays
from controller.learning.dataset import arrays_from_store, requests_summary
from controller.learning.evaluate import policy_metrics
from controller.runtime.checkpoint import ControllerCheckpoint, export_checkpoint, load_checkpoint
from controller.guarantee.guard import Guarded, ShiftGuard, two_sample_test
from controller.runtime.policy import LearnedPolicy, deployed_policy, ignores_task, recall_columns


def min_requests(alpha: float, delta: float) -> int:
    """Fewest calibration requests for which zero observed violations pass Learn-then-Test."""
    lo, hi = 1, 2
    while ltt_p_values(np.array([0.0]), hi, alpha)[0] > delta:
        lo, hi = hi, hi * 2
        if hi > 10**8:
            raise UserError(f"alpha={alpha}, delta={delta} need more than 10^8 requests; raise alpha or delta")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ltt_p_values(np.array([0.0]), mid, alpha)[0] <= delta else (mid, hi)
    return hi


def file_digests(path: str | Path) -> list[dict]:
    """sha256 and size of every prompt file under `path` (what the calibration was made from)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.rglob("*.jsonl"), *p.rglob("*.txt")])
    return [{"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
            for f in files]


def refit_guard(ckpt: ControllerCheckpoint, features: np.ndarray, n_tokens: np.ndarray,
                guard_p: float | None = None) -> ShiftGuard:
    """A new shift guard fitted on `features`, with the checkpoint's guard settings (k, p_min unless
    `guard_p`, fallback, warm-up; the defaults for a checkpoint without a guard)."""
    old = ckpt.guard
    k, p_min, fallback, warmup = (old.k, old.p_min, old.fallback, old.warmup) if old is not None else (5, 0.01, 0.0, 0)
    return ShiftGuard.fit(features, n_tokens, ckpt.net.feature_mean.numpy(), ckpt.net.feature_std.numpy(), k,
                          p_min if guard_p is None else guard_p, fallback, ignore_task=ignores_task(ckpt.record),
                          warmup=warmup)


def lineage(rec: dict) -> dict:
    """What a recalibrated record keeps of the record it came from (`recalibrated_from`)."""
    return {"calibration": rec["calibration"], "policy": rec.get("policy", "controller"),
            "calibration_data": rec.get("calibration_data")}


def risk_levels(ckpt: ControllerCheckpoint, alpha: float | None, delta: float | None) -> tuple[float, float]:
    """--alpha and --delta, the checkpoint's where not given, checked."""
    alpha = ckpt.record["alpha"] if alpha is None else alpha
    delta = ckpt.record["delta"] if delta is None else delta
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise UserError(f"--alpha and --delta must lie in (0, 1), got {alpha}, {delta}")
    return alpha, delta


def offers_adapted(ckpt: ControllerCheckpoint, choice: str, n: int) -> bool:
    """Is the cross-fitted adapted head a candidate for `n` requests: asked for, or `auto` from
    AUTO_MIN requests on (its share of delta costs more than it wins below: measured), on a
    checkpoint whose predictor is the net."""
    from controller.learning.adapt import AUTO_MIN
    if choice not in ("auto", "adapted") or ckpt.record.get("policy", "controller") == "mass_coverage":
        return False
    return choice == "adapted" or n >= AUTO_MIN


@dataclass
class Recalibrated:
    record: dict
    calibration: Calibration
    guard: ShiftGuard
    summary: dict          # on the calibration requests: risk, saving, flagged share, shift vs the old calibration


def as_deployed(ckpt: ControllerCheckpoint, kind: str, **extra):
    """Candidate `kind` as a recalibrated checkpoint would deploy it: every candidate under the
    checkpoint's own decision rule (`policy_decision`), so the policy certified here is the one
    `deployed_policy` rebuilds from the record."""
    keys = {"policy": kind, "policy_decision": ckpt.record["decision"], **extra}
    return deployed_policy(ckpt.net, ckpt.levels, {**ckpt.record, **keys})


def _candidates(ckpt: ControllerCheckpoint, choice: str) -> dict:
    """{name: policy} that the recalibration may deploy."""
    out = {"controller": as_deployed(ckpt, "controller")}
    if recall_columns(ckpt.levels) is not None:
        out["mass_coverage"] = as_deployed(ckpt, "mass_coverage")
    if choice == "adapted":
        return {}   # the adapted head alone (`_adapted`)
    if choice != "auto":
        if choice not in out:
            raise UserError(f"policy {choice!r} is not available for this checkpoint; choose one of {sorted(out)} or auto")
        out = {choice: out[choice]}
    return out


def _adapted(ckpt: ControllerCheckpoint, cal: LabelArrays, choice: str):
    """The cross-fitted adapted candidate (`controller.learning.adapt`), where it applies: asked for, or `auto`
    with enough requests for two halves, on a checkpoint whose predictor is the net."""
    from controller.learning.adapt import MIN_FIT, adapted_candidate
    if not offers_adapted(ckpt, choice, len(cal)):
        return None
    found = adapted_candidate(LearnedPolicy(ckpt.net, "controller", ignores_task(ckpt.record)), cal)
    if found is None and choice == "adapted":
        raise UserError(f"--policy adapted needs at least {2 * MIN_FIT} calibration requests (half to fit, half to "
                        f"certify), got {len(cal)}")
    if found is None:
        return None
    _, head, rows = found
    return as_deployed(ckpt, "adapted", adapter=head), head, rows


def recalibrate(ckpt: ControllerCheckpoint, cal: LabelArrays, alpha: float, delta: float, criterion: dict,
                source: dict, guard_p: float | None = None, choice: str = "auto", edges=(),
                mode: str | None = None) -> Recalibrated:
    """Learn-then-Test of each candidate policy on `cal` at delta / (number of candidates) (a union
    bound: every candidate's certificate holds together with probability >= 1 - delta, so picking
    the one that saves most on `cal` keeps the guarantee), a guard fitted on `cal`, the new record.
    `edges`: length strata, one threshold per stratum ((): one threshold for the mix of lengths in `cal`).
    `mode` crc (None: the checkpoint's): each candidate at alpha / candidates instead, so the expected
    rate of whichever is picked is at most the sum, alpha."""
    rec = ckpt.record
    mode = mode or ckpt.calibration.mode
    old = ckpt.guard
    guard = refit_guard(ckpt, cal.features, cal.n_tokens, guard_p)
    candidates, tried = _candidates(ckpt, choice), {}
    rows = {name: np.arange(len(cal)) for name in candidates}   # the requests each candidate is certified on
    adapted = _adapted(ckpt, cal, choice)
    if adapted is not None:
        candidates["adapted"], head, rows["adapted"] = adapted
    judge = rows.get("adapted", np.arange(len(cal)))   # savings compared on requests no candidate was fitted on
    for name, policy in candidates.items():
        k, part = len(candidates), cal.subset(rows[name])
        c = (calibrate(policy, part, alpha / k, delta, edges, mode) if mode == "crc"
             else calibrate(policy, part, alpha, delta / k, edges, mode))
        chosen = c.decide(Guarded(policy, guard, ckpt.levels).scores(cal.features), cal.n_tokens)
        tried[name] = (c, policy_metrics(cal.subset(judge), chosen[judge]), chosen)
    name = max(tried, key=lambda n: (tried[n][1]["compute_saved"], n == "controller"))
    calibration, m, chosen = tried[name]
    summary = {"violation_rate": m["violation_rate"], "compute_saved": m["compute_saved"], "policy": name,
               "time": expected_time(rec["model"]["fingerprint"], ckpt.levels[chosen], cal.n_tokens),
               "dense_requests": m["dense_requests"], "flagged_share": guard.reference_flagged_share(),
               "candidates": {n: {"calibration": c.to_json(), "compute_saved": mm["compute_saved"],
                                  "violation_rate": mm["violation_rate"]} for n, (c, mm, _) in tried.items()}}
    if old is not None:
        summary["shift_from_previous"] = two_sample_test(old.reference, old.standardise(cal.features))
    record = copy.deepcopy(rec)
    record.pop("format", None)
    record.pop("adapter", None)
    if name == "adapted":
        record["adapter"] = head
    record.update({
        "calibration": calibration.to_json(), "alpha": alpha, "delta": delta, "criterion": criterion, "policy": name,
        "policy_decision": rec["decision"], "guard": guard.to_json(), "recalibrated_from": lineage(rec),
        "calibration_data": {**source, **requests_summary(cal, criterion), "candidates": summary["candidates"]},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    return Recalibrated(record, calibration, guard, summary)


def expected_time(model_fp: dict, levels: np.ndarray, n_tokens: np.ndarray) -> dict | None:
    """Prefill time the decisions on the calibration requests would save, as the hook serves them,
    priced by the newest benchmark recorded for this model (`controller.learning.timing`); None without one."""
    from controller.learning.timing import TimeTable, find_timings
    path = find_timings(model_fp)
    if path is None:
        return None
    table = TimeTable.load(path)
    return {"device": table.device, "source": table.source, "time_saved": table.saved(levels, n_tokens)}


def time_words(time: dict | None, compute_saved: float) -> str:
    """The certified line's last clause: the time saved it can expect, or why none."""
    if time is None:
        return ("; no benchmark timings are recorded for this model, so the time saved is unknown "
                "(python -m controller.benchmark records them on a GPU)")
    where = f"on {time['device']} ({time['source']})"
    if time["time_saved"] <= 0 and compute_saved > 0:
        return (f"; no prefill time saved is expected {where}: every sparse decision is at a length where that card's "
                "break-even runs it dense")
    return f"; expected prefill time saved {where}: {100 * time['time_saved']:.1f}%"


def certified_line(r: Recalibrated) -> str:
    """What was certified, in one line."""
    c, d, s = r.calibration, r.record["calibration_data"], r.summary
    k, crc = len(s["candidates"]), c.mode == "crc"
    promise = (f"E[unsafe-decision rate] <= {r.record['alpha']:g} (conformal risk control)" if crc else
               f"P(unsafe-decision rate <= {c.alpha:g}) >= {1 - r.record['delta']:g}")
    what = (f"on traffic exchangeable with the {d['requests']} calibration requests ({d['tokens'][0]}-{d['tokens'][1]} "
            f"tokens), {promise} under criterion {r.record['criterion']['name']}, deploying {r.record['policy']}"
            + (f" (the better of {k} policies, each tested at {'alpha' if crc else 'delta'}/{k})" if k > 1 else ""))
    if not c.passed:
        return (f"certified: nothing -- no threshold passed {'conformal risk control' if crc else 'Learn-then-Test'} "
                f"{what}; every request runs dense "
                f"(more calibration requests or a larger alpha would help"
                + (", or fewer length strata: --length-strata none)" if c.parts else ")"))
    where = (f" within each of {len(c.parts)} length strata, each tested at delta/{len(c.parts)}; thresholds "
             f"{threshold_text(c.to_json(), counts=True)}" if c.parts else f"; threshold {c.threshold:.4g}")
    return (f"certified: {what}{where}; {100 * s['violation_rate']:.1f}% unsafe and "
            f"{100 * s['compute_saved']:.1f}% attention compute saved on the calibration requests"
            + time_words(s.get("time"), s["compute_saved"]) + "; requests outside "
            f"that length range or feature support run at level {r.guard.fallback:g}"
            + (f", and so do the first {r.guard.warmup} requests of every stream (warm-up)" if r.guard.warmup else ""))


def check_write_paths(out: Path, store: Path, checkpoint: Path, prompts: str, rec: dict, overwrite: bool) -> None:
    """Every path calibrate.py writes, checked before anything is: `out` new, empty, or a checkpoint of
    ours replaced only with --overwrite; the label store new, empty or a store to resume; neither
    is, contains or lies inside the input checkpoint, the prompts, the other output or the
    checkpoint's stores."""
    from controller.learning.pipeline import recorded_stores
    stores = recorded_stores(rec, checkpoint)
    check_output_folder(out, f"--out {out}")   # a file, under a file, unwritable: said first
    check_disjoint(out, f"--out {out}", {"the input checkpoint": checkpoint, "the prompts": prompts,
                                         "the label store": store, **stores})
    check_replaceable(out, f"--out {out}", "checkpoint", overwrite)
    stores.pop("the checkpoint's calibration label store", None)   # resuming it (the same prompts again) is fine
    check_disjoint(store, f"--labels {store}", {"the input checkpoint": checkpoint, "the prompts": prompts, **stores})
    check_store_target(store, f"--labels {store}")


def _prompt_count(prompts: str, criterion: dict, max_requests: int | None) -> int:
    samples = read_prompts(prompts)
    if criterion["name"] == "gold" and any(not s.outputs for s in samples):
        raise UserError(f"{prompts}: some prompts have no `outputs`, which the gold criterion needs; "
                        "use --criterion divergence (label-free)")
    return len(samples) if max_requests is None else min(len(samples), max_requests)


def calibration_report(r: Recalibrated, checkpoint: str, prompts: str) -> str:
    s = r.summary
    lines = ["# Recalibration", "", certified_line(r), "",
             f"- Checkpoint recalibrated: `{checkpoint}`; prompts: `{prompts}` "
             f"({len(r.record['calibration_data']['files'])} files, sha256 in controller.json).",
             f"- Criterion: {r.record['calibration_data']['criterion_text']}.",
             "- Candidates (each Learn-then-Test at delta / their number; the one saving most is deployed): "
             + "; ".join(f"{n}: {100 * c['compute_saved']:.1f}% saved, {100 * c['violation_rate']:.1f}% unsafe"
                         + ("" if c["calibration"]["passed"] else " (nothing passed: dense)")
                         for n, c in s["candidates"].items()) + ".",
             f"- On the calibration requests: {100 * s['violation_rate']:.1f}% unsafe, {100 * s['compute_saved']:.1f}% "
             f"attention compute saved, {100 * s['dense_requests']:.1f}% run dense, {100 * s['flagged_share']:.1f}% "
             "flagged by the new guard (leave-one-out).",
             f"- Covered traffic: {r.guard.describe()}.",
             "- Not covered: traffic that is not exchangeable with these requests (other sources, other lengths, "
             "drift over time). Check with `eval.py`, which reports the guard's flagged share and a two-sample test."]
    prev = s.get("shift_from_previous")
    if prev and prev.get("p_value") is not None:
        lines.append(f"- These requests against the previous calibration requests: two-sample test AUC "
                     f"{prev['auc']:.2f}, p = {prev['p_value']:.2g}"
                     + (" (your traffic differs from what the controller was calibrated on before)." if prev["p_value"] < 0.01 else "."))
    return "\n".join(lines) + "\n"


def calibration_criterion(ckpt: ControllerCheckpoint, name: str) -> dict:
    """The criterion calibrate.py labels under: `name`, the checkpoint's tau; a divergence criterion
    keeps the checkpoint's measure if it has one, else the validated default, and always takes its
    threshold from the new prompts' own noise floor."""
    rec = criterion_dict(ckpt.record["criterion"])
    if name != "divergence":
        return {**rec, "name": name}
    if rec["name"] == "divergence":
        return {**rec, "threshold": None}
    return {**rec, **LABEL_FREE_DEFAULT}


def recalibrate_checkpoint(checkpoint: str, prompts: str, out: str, criterion: str = "divergence",
                           alpha: float | None = None, delta: float | None = None, max_requests: int | None = None,
                           labels: str | None = None, devices: int = 1, batch_samples: int = 8,
                           guard_p: float | None = None, progress: bool = True,
                           model: str | None = None, policy: str = "auto",
                           length_strata: tuple[int, ...] | None = None, overwrite: bool = False,
                           mode: str | None = None
                           ) -> tuple[Path, str] | None:
    """calibrate.py: check everything, label the prompts, recalibrate, export. Returns (checkpoint
    folder, certified line), or None on a non-zero rank of a distributed labeling run."""
    from controller.learning.pipeline import label_requests, path_from
    out_path, ckpt_path = Path(out), Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    check_not_here(out_path, f"--out {out}")
    store = labels or str(out_path.with_name(out_path.name + ".labels"))
    check_write_paths(out_path, Path(store), ckpt_path, prompts, ckpt.record, overwrite)
    crit = calibration_criterion(ckpt, criterion)
    alpha, delta = risk_levels(ckpt, alpha, delta)
    if guard_p is not None and not 0 <= guard_p < 1:
        raise UserError(f"--guard-p must lie in [0, 1), got {guard_p}")
    from controller.learning.adapt import MIN_FIT
    mode = mode or ckpt.calibration.mode
    n = _prompt_count(prompts, crit, max_requests)
    adapts = offers_adapted(ckpt, policy, n) and n >= 2 * MIN_FIT
    count = max(1, len(_candidates(ckpt, policy)) + adapts)
    need = min_requests(alpha, delta / count) if mode == "ltt" else math.ceil(count / alpha - 1)   # crc: (0 + 1)/(n + 1) <= alpha/k
    if n < need:
        each = f" at delta/{count} for each of {count} candidate policies" if count > 1 else ""
        raise UserError(f"{n} requests are too few to certify alpha={alpha:g} with delta={delta:g}: Learn-then-Test "
                        f"needs at least {need}{each} (with zero violations); give more prompts, a larger alpha/delta"
                        + (" or --policy controller" if count > 1 else ""))
    root = label_requests(ckpt, DataConfig(tasks=(), prompts=(prompts,), max_prompts=max_requests), Path(store), crit,
                          devices=devices, batch_samples=batch_samples, progress=progress, model=model,
                          null_share=null_share_for(n) if crit["name"] == "divergence" else 0.0)
    if not root:
        return None
    from data.store import LabelStore
    from controller.learning.dataset import store_hash
    crit = resolved(LabelStore(root).table(), crit)   # divergence: the threshold from these prompts' noise floor
    cal = arrays_from_store(root, crit)[0]
    source = {"source": f"prompts {prompts}", "files": file_digests(prompts), "label_store": root,
              "label_store_from_checkpoint": path_from(root, out_path), "label_store_sha256": store_hash(root)}
    edges = ckpt.calibration.edges if length_strata is None else length_strata   # None: the checkpoint's strata
    r = recalibrate(ckpt, cal, alpha, delta, crit, source, guard_p, policy, edges, mode)
    line = certified_line(r)
    path = export_checkpoint(out_path, ckpt.net, r.record, {"calibration.md": calibration_report(r, checkpoint, prompts)})
    return path, line
