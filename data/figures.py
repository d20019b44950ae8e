"""The length finding of a label store: largest safe level vs input length per task, with
bootstrap confidence intervals, as a table (markdown) and a figure (PNG).

Owns `label_vs_length` (the table), `plot_label_vs_length` and `write_length_finding` (both into
the store folder, atomically). Imports nothing from `controller`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .store import LabelStore, apply_criterion, atomic_target, sample_labels, write_text_atomic


def bootstrap_ci(values: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0):
    """Percentile bootstrap interval of the mean (degenerate for a single value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def label_vs_length(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, target length): n, mean label, 95% CI. Tasks pooled as `all` too."""
    rows = []
    pooled = labels.assign(task="all")
    for (task, length), g in pd.concat([labels, pooled]).groupby(["task", "target_length"]):
        lo, hi = bootstrap_ci(g["label"].to_numpy())
        rows.append({"task": task, "target_length": int(length), "n": len(g),
                     "mean_label": round(float(g["label"].mean()), 3), "ci_low": round(lo, 3), "ci_high": round(hi, 3),
                     "mean_achieved_at_label": round(float(g["label_achieved"].mean()), 3)})
    return pd.DataFrame(rows)


TITLE_CHARS = 95   # at fontsize 9, what a 7-inch-wide figure shows on one line


def wrapped_title(title: str, width: int = TITLE_CHARS) -> str:
    """A plot title broken into lines that fit the figure (a long model header was cut off)."""
    import textwrap
    return "\n".join(textwrap.wrap(title, width)) or title


def plot_label_vs_length(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, g in table.groupby("task"):
        g = g.sort_values("target_length")
        err = np.vstack([g["mean_label"] - g["ci_low"], g["ci_high"] - g["mean_label"]])
        style = {"color": "black", "linewidth": 2.5} if task == "all" else {"alpha": 0.8}
        ax.errorbar(g["target_length"], g["mean_label"], yerr=err, marker="o", capsize=3, label=task, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("largest safe sparsity level (mean, 95% CI)")
    ax.set_title(wrapped_title(title), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_target(path, ".tmp.png") as tmp:   # the suffix tells matplotlib the format
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_length_finding(store: LabelStore, criterion=None) -> tuple[Path, Path]:
    """label_vs_length.md and label_vs_length.png in the store folder."""
    meta = store.meta()
    labels = sample_labels(apply_criterion(store.table(), criterion if criterion is not None else meta["criterion"]))
    table = label_vs_length(labels)
    md, png = store.root / "label_vs_length.md", store.root / "label_vs_length.png"
    write_text_atomic(md, table.to_markdown(index=False) + "\n")
    sparse = meta["identity"]["sparse"]
    title = (f"{meta['model_name']} ({meta['identity']['model']['id']}), {sparse['method']} block {sparse['block_size']}, "
             f"{labels['sample_id'].nunique()} samples")
    plot_label_vs_length(table, png, title)
    return md, png
