"""The evaluation report: `metrics.json`, `report.md` and PNG figures in one folder.

Owns `goals` (the controller against the fixed budget, the length-law and the oracle),
`write_report` (every file written to a temporary name, then renamed) and the three figures:
safe level vs length per task, violation vs compute saved for every policy over the alpha sweep,
and the reliability of P(safe). Imports `data` and `controller` modules below it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from data.figures import label_vs_length, plot_label_vs_length
from data.store import atomic_target, write_text_atomic

from controller.guarantee.calibrate import guarantee_text, threshold_text
from controller.guarantee.arrays import LabelArrays


def goals(metrics: dict, alpha: float) -> dict:
    p = metrics["policies"]
    c = p["controller"]["compute_saved"]
    fixed, law, oracle = (p[k]["compute_saved"] for k in ("fixed", "length_law", "oracle"))
    return {"controller_violation_le_alpha": p["controller"]["violation_rate"] <= alpha,
            "saves_more_than_fixed": c > fixed, "saves_more_than_length_law": c > law,
            "ratio_to_fixed": c / fixed if fixed > 0 else (math.inf if c > 0 else None),
            "share_of_oracle": c / oracle if oracle > 0 else None,
            "ratio_to_mass_coverage": (c / p["mass_coverage"]["compute_saved"] if p["mass_coverage"]["compute_saved"] > 0
                                       else None) if "mass_coverage" in p else None, "goal_ratio_to_mass_coverage": 1.2,
            "goal_ratio_to_fixed": 2.0, "goal_share_of_oracle": 0.85}


def why_short(metrics: dict) -> str:
    """A paragraph, from the measured numbers, on where the controller's saving is lost."""
    p, d = metrics["policies"], metrics["diagnostics"]
    oracle, got = p["oracle"]["compute_saved"], p["controller"]["compute_saved"]
    if oracle <= 0:
        return "The oracle saves nothing on these requests: no policy can."
    ceiling = d["best_in_hindsight"]["controller"]
    aucs = ", ".join(f"{k}: {v:.2f}" for k, v in d["auc_p_safe"].items() if v is not None)
    return (f"Where the saving goes: the oracle saves {100 * oracle:.1f}%. Even with its threshold tuned on these "
            f"test requests themselves (no guarantee), the controller's scores would save {100 * ceiling:.1f}% at "
            f"violation <= alpha ({100 * ceiling / oracle:.0f}% of the oracle): the features available before the "
            f"sparse layers (length, text statistics, attention probes of the dense layers, task) separate safe "
            f"from unsafe requests only partly (ROC AUC of P(safe) per level: {aucs}). The rest, "
            f"{100 * (ceiling - got):.1f} points, is the price of a guarantee proven on "
            f"{metrics['n_calibration']} calibration requests ("
            f"{guarantee_text(metrics.get('calibration_mode', 'ltt'), metrics['alpha'], metrics['delta'])}).")


def _fmt(v, pct=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def policy_table(policies: dict) -> str:
    timed = "time_saved" in next(iter(policies.values()))
    lines = ["| policy | violation rate (95% CI) | " + ("time saved | " if timed else "") + "compute saved | mean level | "
             "mean achieved sparsity | accuracy vs dense | dense requests | threshold | calibrated | n |",
             "|" + "---|" * (11 if timed else 10)]
    for name, m in policies.items():
        cal = m.get("calibration")
        lo, hi = m["violation_ci95"]
        thr = "-" if cal is None else threshold_text(cal)
        ok = "oracle" if cal is None else ("yes" if cal["passed"] else "no: dense")
        time = f"{_fmt(m['time_saved'], True)} | " if timed else ""
        lines.append(f"| {name} | {_fmt(m['violation_rate'], True)} ({_fmt(lo, True)}-{_fmt(hi, True)}) | {time}"
                     f"{_fmt(m['compute_saved'], True)} | {_fmt(m['mean_level'])} | {_fmt(m['mean_achieved_sparsity'])} | "
                     f"{_fmt(m['accuracy_vs_dense'])} | {_fmt(m['dense_requests'], True)} | {thr} | {ok} | {m['n']} |")
    return "\n".join(lines)


def breakdown_table(policies: dict, key: str, value: str = "compute_saved") -> str:
    groups = list(next(iter(policies.values()))[key])
    lines = [f"| policy | {' | '.join(groups)} |", "|" + "---|" * (len(groups) + 1)]
    for name, m in policies.items():
        cells = [f"{_fmt(m[key][g][value], True)} / {_fmt(m[key][g]['violation_rate'], True)}" for g in groups]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_target(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_tradeoff(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweep = pd.DataFrame(metrics["alpha_sweep"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, g in sweep.groupby("policy", sort=False):
        g = g.sort_values("alpha")
        ax.plot(100 * g["violation_rate"], 100 * g["compute_saved"], marker="o", label=name)
    o = metrics["policies"]["oracle"]
    ax.scatter([100 * o["violation_rate"]], [100 * o["compute_saved"]], marker="*", s=160, color="black", label="oracle")
    ax.axvline(100 * metrics["alpha"], color="grey", linestyle=":", label=f"alpha = {metrics['alpha']}")
    ax.set_xlabel("violation rate on the test split (%)")
    ax.set_ylabel("attention compute saved (%)")
    ax.set_title("each point: a policy calibrated at one alpha of the sweep", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_reliability(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.plot([r["mean_predicted"] for r in rows], [r["observed_safe"] for r in rows], marker="o")
    ax.set_xlabel("controller P(safe) (bin mean)")
    ax.set_ylabel("observed safe fraction")
    ax.set_title("calibration of P(safe), test split, every sparse level", fontsize=9)
    _save(fig, path)


def length_finding(arrays: LabelArrays, path: Path, title: str) -> pd.DataFrame:
    labels = pd.DataFrame({"task": arrays.tasks, "target_length": arrays.target_length,
                           "label": arrays.levels[arrays.label_index],
                           "label_achieved": arrays.achieved[np.arange(len(arrays)), arrays.label_index]})
    table = label_vs_length(labels)
    plot_label_vs_length(table, path, title)
    return table


def write_report(out: Path, metrics: dict, arrays: LabelArrays, header: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    metrics["goals"] = goals(metrics, metrics["alpha"])
    table = length_finding(arrays, out / "label_vs_length.png", header)
    plot_tradeoff(metrics, out / "tradeoff.png")
    plot_reliability(metrics["reliability"], out / "reliability.png")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    write_text_atomic(out / "report.md", report_markdown(metrics, table, header))
    return out


def goal_lines(metrics: dict) -> list[str]:
    g, p = metrics["goals"], metrics["policies"]
    c = p["controller"]
    lines = [time_line(metrics)] if "time_saved" in c else []
    lines += [f"- Controller violation rate {_fmt(c['violation_rate'], True)} vs alpha {metrics['alpha']}: "
             f"{'met' if g['controller_violation_le_alpha'] else 'NOT met'}."]
    ratio, share = g["ratio_to_fixed"], g["share_of_oracle"]
    fixed = p["fixed"]["compute_saved"]
    lines.append(f"- Compute saved: controller {_fmt(c['compute_saved'], True)}, fixed {_fmt(fixed, True)}, "
                 f"length-law {_fmt(p['length_law']['compute_saved'], True)}, oracle {_fmt(p['oracle']['compute_saved'], True)}.")
    lines.append("- Against the fixed budget (goal >= 2x): "
                 + ("fixed saves nothing at this alpha, so any saving is an unbounded ratio" if fixed <= 0 else f"{ratio:.2f}x")
                 + f"; against the oracle (goal >= 85%): {_fmt(share, True)}"
                 + ("" if share is None or share >= 0.85 else f", short by {_fmt(0.85 - share, True)} of the oracle's saving")
                 + ".")
    if "mass_coverage" in p:
        mc, r = p["mass_coverage"], g["ratio_to_mass_coverage"]
        lines.append(f"- Against the calibrated mass-coverage baseline (goal >= 1.2x): it saves {_fmt(mc['compute_saved'], True)} "
                     f"at {_fmt(mc['violation_rate'], True)} violations; "
                     + ("the controller saves something where it saves nothing" if r is None and c['compute_saved'] > 0
                        else "neither saves anything, so there is no ratio" if r is None
                        else f"the controller saves {r:.2f}x as much") + ".")
    return lines


def time_line(metrics: dict) -> str:
    """The headline: wall-clock prefill time saved at the controller's decisions, per length."""
    p, t = metrics["policies"], metrics["timings"]
    c = p["controller"]
    per = ", ".join(f"{k} {_fmt(v['time_saved'], True)}" for k, v in c["per_length"].items())
    return (f"- **Time saved: controller {_fmt(c['time_saved'], True)}** of dense prefill time ({per}); oracle "
            f"{_fmt(p['oracle']['time_saved'], True)}. Priced by the {t['device']} timings of {t['source']} "
            f"(measured at {', '.join(str(n) for n in t['lengths'])} tokens; best dense path, decision included).")


def shift_lines(shift: dict) -> str:
    covered = f" The guarantee covers {shift['covered']}." if "covered" in shift else ""
    return shift.get("words", "") + covered


def _strata_words(cal: dict | None) -> str:
    """', one threshold per length stratum (...)' for a stratified calibration, else ''."""
    if not cal or not cal.get("parts"):
        return ""
    k = len(cal["parts"])
    return (f", one threshold per length stratum ({threshold_text(cal, counts=True)}), each at delta/{k}: "
            "the bound holds within every stratum")


def report_markdown(metrics: dict, length_table: pd.DataFrame, header: str) -> str:
    p = metrics["policies"]
    parts = [f"# Controller report\n\n{header}\n",
             f"Evaluated on {metrics['evaluated_on']} ({metrics['n']} requests). Calibration: "
             f"{guarantee_text(metrics.get('calibration_mode', 'ltt'), metrics['alpha'], metrics['delta'])}, "
             f"{metrics['n_calibration']} calibration requests"
             f"{_strata_words(p.get('controller', {}).get('calibration'))}. A violation = the request fails the safety criterion at the level chosen for it. compute saved = 1 - "
             "attention blocks computed (all layers) / dense causal blocks, summed over requests.\n",
             f"Violations are judged by the criterion {metrics['criterion_text']}. The controller's threshold was "
             f"calibrated on the {metrics['calibrated_on']} under {metrics['checkpoint_criterion_text']}.\n",
             "## Is this traffic covered by the guarantee?\n", shift_lines(metrics.get("shift", {})), "",
             "## Goals\n", *goal_lines(metrics), "", metrics.get("why", ""), "",
             "## Every policy\n", policy_table(p), "",
             "## Per task (compute saved / violation rate)\n", breakdown_table(p, "per_task"), "",
             "## Per length bucket (compute saved / violation rate)\n", breakdown_table(p, "per_length"), "",
             *(["## Per length bucket (time saved / violation rate)\n", breakdown_table(p, "per_length", "time_saved"), ""]
               if "time_saved" in p["controller"] else []),
             "## Trade-off (alpha sweep)\n", "![trade-off](tradeoff.png)\n",
             pd.DataFrame(metrics["alpha_sweep"]).to_markdown(index=False, floatfmt=".3f"), "",
             "## Safe level vs length per task (the paper's finding, these requests)\n",
             "![label vs length](label_vs_length.png)\n", length_table.to_markdown(index=False), "",
             "## Calibration of P(safe)\n", "![reliability](reliability.png)\n",
             pd.DataFrame(metrics["reliability"]).to_markdown(index=False, floatfmt=".3f"), "",
             "## Provenance\n", "```json", json.dumps(metrics["provenance"], indent=1), "```", ""]
    return "\n".join(parts)
