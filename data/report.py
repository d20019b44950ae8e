"""Text summaries of a label store (safe fraction per level and length, labels per task).
Imports nothing from `controller`."""
from __future__ import annotations

from .store import LabelStore, apply_criterion, safe_fraction_table, sample_labels


def summary_markdown(store: LabelStore, criterion=None) -> str:
    meta = store.meta()
    df = apply_criterion(store.table(), criterion if criterion is not None else meta["criterion"])
    labels = sample_labels(df)
    fp = meta["identity"]["model"]
    lines = [f"model {meta['model_name']} ({fp['id']}), method {meta['identity']['sparse']['method']}, "
             f"block {meta['identity']['sparse']['block_size']}, backend {meta['backend']} on {meta['device']}, "
             f"{df['sample_id'].nunique()} samples, tasks: {', '.join(sorted(df['task'].unique()))}",
             "", "Safe fraction per nominal level (rows) and target length (columns); "
             "achieved sparsity is the mean measured from the block index:", ""]
    table = safe_fraction_table(df)
    table["achieved"] = df.groupby("level")["achieved_sparsity"].mean()
    lines.append(table.round(3).to_markdown())
    lines += ["", "Mean label (largest safe level) per task and target length:", ""]
    lines.append(labels.pivot_table(index="task", columns="target_length", values="label", aggfunc="mean")
                 .round(3).to_markdown())
    dense = df[df["level"] == 0.0].groupby("task")["score"].mean().round(3)
    lines += ["", "Dense task score per task: " + ", ".join(f"{k} {v}" for k, v in dense.items())]
    warning = dense_fails_warning(df, criterion if criterion is not None else meta["criterion"])
    if warning:
        lines += ["", warning]
    if labels["form"].nunique() > 1:
        lines += ["", spread_markdown(labels)]
    return "\n".join(lines)


def dense_fails_warning(df, criterion) -> str | None:
    """A warning when the dense model answers no request right and the labels are judged by `gold`:
    'not below dense' then labels every level safe, and the labels say nothing about the model."""
    name = criterion.get("name") if isinstance(criterion, dict) else getattr(criterion, "name", None)
    scores = df.loc[df["level"] == 0.0, "score"].dropna()
    if name != "gold" or not len(scores) or scores.max() > 0:
        return None
    return (f"warning: the dense model scores 0 on all {len(scores)} requests, so under the gold criterion every level is "
            "labeled safe and these labels say nothing about sparsity; use a model that solves these tasks, or a "
            "label-free criterion (criterion.name=divergence)")


def spread_markdown(labels) -> str:
    """Does the family name decide the label? Per family and length: how many distinct labels, the
    share of samples at the most common one, and the label's standard deviation; then the mean label
    per family and haystack kind (the first part of the surface form)."""
    def cell(g):
        top = g.value_counts(normalize=True).iloc[0]
        return f"{g.nunique()} / {100 * top:.0f}% / {g.std(ddof=0):.2f}"
    spread = labels.groupby(["task", "target_length"])["label"].apply(cell).unstack()
    by_filler = labels.assign(filler=labels["form"].str.split("/").str[0]).pivot_table(
        index="task", columns="filler", values="label", aggfunc="mean").round(2)
    return "\n".join([
        "Spread of labels within each family and length (distinct labels / share at the most common label / std):",
        "", spread.to_markdown(), "", "Mean label per family and haystack kind (all lengths):", "",
        by_filler.to_markdown()])


def print_summary(store: LabelStore, criterion=None) -> None:
    print(summary_markdown(store, criterion))
