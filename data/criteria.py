"""safe(request, level) from a store's raw columns: the criteria, in one place.

- `gold` (needs reference outputs): the task score is not below dense and the NLL of the reference
  (or dense) answer rises by at most tau.
- `fidelity` (label-free): the sparse greedy answer equals the dense one after the task's
  normalisation, and the dense answer's NLL rises by at most tau. Flips on one token, so it carries
  decoding noise (a near-tie decided differently).
- `divergence` (label-free): the sparse row's next-token distributions along the dense answer
  (teacher forced, so one flipped token cannot derail the rest) differ from the dense row's by no
  more than dense serving noise does. `measure` names the raw column (see
  `data.labeling.divergence_from`); its threshold is the `null_quantile` quantile of the same
  measurement between the dense row computed alone and the dense row in the labeler's batch (the
  store's `null_*` columns, `labeling.null_share`), unless `threshold` fixes it. The threshold used
  is data: it is returned with the labels and recorded in checkpoints.
Owns `criterion_dict`, `describe_criterion`, `apply_criterion`, `null_threshold`, `resolved`,
`null_share_for`, `missing_outputs`.
Imports only `data.errors` and `data.tasks.scoring`; never `controller`.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd

from .errors import UserError

# measure -> +1 when larger is worse (safe iff value <= threshold), -1 when smaller is worse
MEASURES = {"kl_mean": 1, "kl_max": 1, "gap_max": 1, "top1_agree": -1, "agree_prefix": -1}
DEFAULTS = {"tau": 0.1, "nll_reference": "gold", "require_score": True, "name": "gold",
            "measure": "kl_mean", "threshold": None, "null_quantile": 0.999}
# calibrate.py's default: the label-free criterion that won the validation (docs/results/criteria.md)
LABEL_FREE_DEFAULT = {"name": "divergence", "measure": "kl_mean", "null_quantile": 0.999, "threshold": None}
NULL_REQUESTS = 40   # dense-vs-dense pairs a calibration labels for its threshold (at least a quarter of the prompts)


def null_share_for(requests: int) -> float:
    """The share of `requests` labeled with a dense reference alone: NULL_REQUESTS of them, at least a quarter."""
    return min(1.0, max(0.25, NULL_REQUESTS / max(requests, 1)))


def resolved(df: pd.DataFrame, criterion) -> dict:
    """The criterion with a divergence threshold fixed from these rows' noise floor (so that a
    checkpoint records the number it was calibrated under, and other traffic is judged by it)."""
    crit = criterion_dict(criterion)
    if crit["name"] == "divergence" and crit["threshold"] is None:
        crit["threshold"] = null_threshold(df, crit["measure"], crit["null_quantile"])
    return crit


def criterion_dict(criterion) -> dict:
    """A criterion as a plain dict with every key (records written before `name` existed are gold)."""
    crit = dict(criterion) if isinstance(criterion, dict) else asdict(criterion)
    return {**DEFAULTS, **crit}


def describe_criterion(criterion) -> str:
    """The criterion in words, for reports and the calibration line."""
    c = criterion_dict(criterion)
    if c["name"] == "fidelity":
        return (f"fidelity (label-free): the sparse greedy answer equals the dense one after the task's "
                f"normalisation, and the dense answer's NLL rises by at most {c['tau']:g} nats/token")
    if c["name"] == "divergence":
        op = "<=" if MEASURES[c["measure"]] > 0 else ">="
        t = "the null's" if c["threshold"] is None else f"{c['threshold']:.3g}, the null's"
        return (f"divergence (label-free): along the dense answer, teacher forced, {c['measure']} of the sparse row "
                f"against the dense row {op} {t} {c['null_quantile']:g} quantile (dense alone vs dense in a batch)")
    ref = "the reference answer's" if c["nll_reference"] == "gold" else "the dense answer's"
    score = "the task score is not below dense, and " if c["require_score"] else ""
    return f"gold (needs reference outputs): {score}{ref} NLL rises by at most {c['tau']:g} nats/token"


def null_values(df: pd.DataFrame, measure: str) -> np.ndarray:
    """One dense-vs-dense value of `measure` per request that has one (the store's noise floor)."""
    col = f"null_{measure}"
    if col not in df:
        return np.array([])
    per_sample = df.groupby("sample_id", sort=True)[col].first()
    return per_sample.dropna().to_numpy(float)


def null_threshold(df: pd.DataFrame, measure: str, quantile: float) -> float:
    """The `quantile` of the dense-vs-dense values of `measure` (its lower 1 - quantile for a
    measure where smaller is worse). UserError when the rows carry no noise floor."""
    if measure not in MEASURES:
        raise UserError(f"criterion.measure must be one of {sorted(MEASURES)}, got {measure!r}")
    values = null_values(df, measure)
    if len(values) < 20:
        raise UserError(f"the divergence criterion needs the noise floor of at least 20 requests, these labels have "
                        f"{len(values)}; label them anew with it (calibrate.py: a new --labels folder; train.py: "
                        "labeling.null_share > 0), set criterion.threshold, or use --criterion fidelity")
    return floor_quantile(values, measure, quantile)


def floor_quantile(values: np.ndarray, measure: str, quantile: float) -> float:
    """The bound a safe row must keep: the `quantile` of the noise-floor values (their lower
    1 - quantile for a measure where smaller is worse), never between two observed values."""
    if MEASURES[measure] > 0:
        return float(np.quantile(values, quantile, method="higher"))
    return float(np.quantile(values, 1 - quantile, method="lower"))


def within_bound(value, measure: str, threshold: float):
    """A row's measurement keeps the criterion's bound (`value` a number or an array)."""
    return value <= threshold if MEASURES[measure] > 0 else value >= threshold


def _same_answer_as_dense(df: pd.DataFrame) -> pd.Series:
    from .tasks.scoring import normalise_answer
    norm = pd.Series([normalise_answer(t, a if isinstance(a, str) else "") for t, a in zip(df["task"], df["answer"])],
                     index=df.index, dtype=object)
    dense = norm[df["level"] == 0.0]
    dense_by_sample = dict(zip(df.loc[dense.index, "sample_id"], dense))
    return pd.Series([n == dense_by_sample.get(s) for n, s in zip(norm, df["sample_id"])], index=df.index)


def _divergence_safe(df: pd.DataFrame, crit: dict) -> pd.Series:
    measure = crit["measure"]
    if measure not in df:
        raise UserError(f"these labels have no raw column {measure!r} (stores labeled before the divergence "
                        "measurements); relabel them, or use the gold or fidelity criterion")
    t = crit["threshold"] if crit["threshold"] is not None else null_threshold(df, measure, crit["null_quantile"])
    return within_bound(df[measure].astype(float), measure, t) | (df["level"] == 0.0)


def apply_criterion(df: pd.DataFrame, criterion) -> pd.DataFrame:
    """Add `dense_score`, `dense_nll`, `nll_rise` and `safe` from the raw columns."""
    crit = criterion_dict(criterion)
    if crit["name"] in ("gold", "fidelity") and "answer" in df and df["answer"].isna().any():
        raise UserError(f"the {crit['name']} criterion judges every level's greedy answer, but "
                        f"{int(df['answer'].isna().sum())} rows were labeled without one "
                        "(labeling.sparse_answers: false); judge them with --criterion divergence, or relabel "
                        "with labeling.sparse_answers: true")
    label_free = crit["name"] in ("fidelity", "divergence")
    nll_col = "nll_dense_answer" if label_free or crit["nll_reference"] == "dense" else "nll_gold"
    dense = df[df["level"] == 0.0].set_index("sample_id")
    out = df.copy()
    out["dense_score"] = out["sample_id"].map(dense["score"])
    out["dense_nll"] = out["sample_id"].map(dense[nll_col])
    out["nll_rise"] = out[nll_col] - out["dense_nll"]
    nll_ok = (out["nll_rise"] <= crit["tau"]) | out["nll_rise"].isna()
    if crit["name"] == "divergence":
        out["safe"] = _divergence_safe(out, crit)
        return out
    if crit["name"] == "fidelity":
        out["safe"] = nll_ok & _same_answer_as_dense(out)
        return out
    score_ok = (out["score"] >= out["dense_score"] - 1e-9) if crit["require_score"] else True
    out["safe"] = nll_ok & score_ok
    return out


def missing_outputs(df: pd.DataFrame) -> int:
    """How many requests have no reference outputs (the gold criterion cannot judge them)."""
    dense = df[df["level"] == 0.0]
    return int(sum(len(o) == 0 if o is not None else True for o in dense["outputs"]))
