"""calibrate.py --reweigh: recertify a checkpoint for your traffic without labeling it.

Only the features of your prompts are computed (a dense forward that stops after the probe layers:
no sparse prefill, no decoding, no answers). The checkpoint's own calibration requests are then
reweighed toward your prompts' features (`controller.guarantee.weighted`: density ratios from a cross-fitted
logistic classifier) and Learn-then-Test runs on their weighted violation rates at the effective
sample size. This holds if your traffic differs from the calibration traffic only in its features
(covariate shift: the chance that a level is safe given the features is unchanged), and it is an
approximation because the weights are estimated; the checkpoint and the certified line say both.
Refused in one line when the two sets are separable (no overlap to reweigh) or the effective size
is below what Learn-then-Test needs. Imports `data` and `controller` modules below it.
"""
from __future__ import annotations

import copy
import datetime
from pathlib import Path

import numpy as np

from data.features import FEATURE_NAMES, feature_vector
from data.outputs import check_not_here

from controller.runtime.checkpoint import export_checkpoint, load_checkpoint
from controller.guarantee.guard import as_unknown_task
from controller.runtime.policy import deployed_policy
from controller.guarantee.recalibrate import check_write_paths, file_digests, lineage, min_requests, refit_guard, risk_levels
from controller.guarantee.weighted import density_ratios, weighted_calibrate


def prompt_features(ckpt, prompts: str, max_requests: int | None, model: str | None = None) -> np.ndarray:
    """[n, F] features of the prompts as the hook computes them (probe layers of a dense forward)."""
    from data.backfill import probe_features
    from data.config import SparseConfig
    from data.labeling import choose_prompts
    from data.models import load_model
    from data.tasks import prompt_ids, read_prompts
    from controller.learning.pipeline import check_same_model
    rec = ckpt.record
    lm = load_model(model or rec["model"]["name"])
    check_same_model(lm, ckpt, model or rec["model"]["name"])
    from sparse_kernels import enable_sparse_attention
    enable_sparse_attention(lm.model)   # the probes run inside the project's attention function
    sparse = SparseConfig(**rec["sparse"])
    samples = choose_prompts(read_prompts(prompts), max_requests, 0)
    return np.stack([feature_vector(probe_features(lm, sparse, prompt_ids(lm.tokenizer, s), s.task)) for s in samples])


def reweighed_record(ckpt, cal, live: np.ndarray, alpha: float, delta: float, source: dict) -> tuple[dict, str]:
    """The new record and its certified line, from the calibration requests `cal` and live features."""
    rec = ckpt.record
    reference = as_unknown_task(cal.features)
    live = as_unknown_task(live)
    w, info = density_ratios(reference, live)
    policy = deployed_policy(ckpt.net, ckpt.levels, rec)
    cal = type(cal)(**{**cal.__dict__, "features": reference})
    c = weighted_calibrate(policy, cal, w, alpha, delta, min_requests(alpha, delta))
    chosen = c.decide(policy.scores(reference))
    rows = np.arange(len(cal))
    saved = float(1.0 - (w * cal.kept[rows, chosen]).sum() / (w * cal.causal).sum())   # as the live traffic would
    n_tokens = np.rint(np.exp(live[:, FEATURE_NAMES.index("log_length")])).astype(np.int64)
    guard = refit_guard(ckpt, live, n_tokens)
    record = copy.deepcopy(rec)
    record.pop("format", None)
    record.update({"calibration": c.to_json(), "alpha": alpha, "delta": delta, "guard": guard.to_json(),
                   "recalibrated_from": lineage(rec),
                   "calibration_data": {**source, "reweighed": {**info, "requests": len(w), "live_prompts": len(live)},
                                        "requests": len(w), "tokens": [int(n_tokens.min()), int(n_tokens.max())]},
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    line = (f"certified (reweighed, approximate: the weights are estimated): on traffic like the {len(live)} prompts, "
            f"P(unsafe-decision rate <= {alpha:g}) >= {1 - delta:g} under criterion {rec['criterion']['name']}, if "
            f"only the features shifted; the checkpoint's {len(w)} calibration requests reweighed to an effective "
            f"size of {info['effective_size']:.0f} (classifier AUC {info['auc']:.2f}); "
            + (f"threshold {c.threshold:.4g}, {100 * saved:.1f}% attention compute saved on them (reweighed)"
               if c.passed else "nothing passed: every request runs dense"))
    return record, line


def reweigh_checkpoint(checkpoint: str, prompts: str, out: str, alpha: float | None = None,
                       delta: float | None = None, max_requests: int | None = None, model: str | None = None,
                       overwrite: bool = False) -> tuple[Path, str]:
    """calibrate.py --reweigh: check, compute the prompts' features, reweigh, export."""
    from data.criteria import criterion_dict
    from controller.learning.pipeline import calibration_arrays
    out_path, ckpt_path = Path(out), Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    check_not_here(out_path, f"--out {out}")
    check_write_paths(out_path, out_path.with_name(out_path.name + ".labels"), ckpt_path, prompts, ckpt.record, overwrite)
    alpha, delta = risk_levels(ckpt, alpha, delta)
    _, cal, where = calibration_arrays(ckpt.record, criterion_dict(ckpt.record["criterion"]), ckpt_path)
    live = prompt_features(ckpt, prompts, max_requests, model)
    source = {"source": f"prompts {prompts} (unlabeled), reweighing {where}", "files": file_digests(prompts)}
    record, line = reweighed_record(ckpt, cal, live, alpha, delta, source)
    path = export_checkpoint(out_path, ckpt.net, record, {"calibration.md": f"# Recalibration (reweighed)\n\n{line}\n"})
    return path, line
