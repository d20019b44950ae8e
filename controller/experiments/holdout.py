"""The held-out-group experiment: does the guarantee hold on traffic the controller never saw?

Groups are task families (`--by family`) or one dimension of the surface form (`--by filler`,
`phrasing` or `chat`: leave one haystack kind, phrasing or template setting out). For each group:
train a controller on every other group of a label store (criterion from the config, `fidelity` by
default here), then on the held-out group, with the task hidden (the requests arrive as `unknown`,
as user prompts do):
- zero shot: the checkpoint as trained, behind its shift guard; plus a two-sample test of the
  family's features against the checkpoint's calibration requests;
- recalibrated: `recalibrate` on `--calibration-requests` of the family's requests (their stored
  labels under the label-free criterion, so no answers are used), evaluated on the family's
  remaining requests.
Writes JSON (every number) and a markdown table.

  python -m controller.holdout --config configs/demo_smollm2.yaml --by family --out docs/results/holdout_family.json

Imports every `controller` module it needs; nothing imports it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from data.errors import ArgumentParser, UserError, error_line, doc_summary

FAMILIES = {"niah": ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"), "vt": ("vt",),
            "cwe": ("cwe",), "fwe": ("fwe",), "qa": ("qa",),
            "natural": ("nat_constant", "nat_docqa", "nat_chat", "nat_aggregate", "nat_summary")}   # data/tasks/natural.py
GROUPINGS = {"family": tuple(FAMILIES), "filler": ("prose", "repeat", "code", "json"),
             "phrasing": ("p0", "p1", "p2"), "chat": ("chat", "plain")}


def in_group(arrays, by: str, group: str) -> np.ndarray:
    """[n] bool: the requests of `group` under the grouping `by`."""
    if by == "family":
        return np.isin(arrays.tasks, FAMILIES[group])
    from data.tasks.forms import form_part
    forms = arrays.forms if arrays.forms is not None else np.full(len(arrays), "")
    return np.array([form_part(f, by) == group for f in forms])


def check_groups(arrays, by: str, groups: list[str], n_cal: int) -> None:
    """UserError, before any training, when the store cannot hold out these groups: no surface forms
    for a form grouping, or a group too small (more than `n_cal` held out, 50 left to train on)."""
    if by != "family" and arrays.forms is None:
        raise UserError(f"--by {by} needs a store labeled with surface forms (data.forms); this one has none: "
                        "use --by family")
    for g in groups:
        held = in_group(arrays, by, g)
        if held.sum() <= n_cal or (~held).sum() < 50:
            raise UserError(f"group {by}={g} has {int(held.sum())} requests and leaves {int((~held).sum())}; need more "
                            f"than --calibration-requests {n_cal} held out and 50 to train on: label more, or lower "
                            "--calibration-requests")


def check_output_file(path: str, what: str) -> None:
    """UserError unless `path` (and the .md beside it) can be written as files: not folders, the parent
    a folder we may write."""
    from data.errors import check_output_folder
    for target in (Path(path), Path(path).with_suffix(".md")):
        if target.is_dir():
            raise UserError(f"{what}: {target} is a folder; give a file path such as results/holdout.json")
    parent = Path(path).absolute().parent
    under = next((a for a in (parent, *parent.parents) if a.exists()), None)
    if under is not None and not under.is_dir():
        raise UserError(f"{what} lies under a file ({under}); give a file path in a folder")
    check_output_folder(parent, what)


def hide_task(arrays):
    """Copy of `arrays` whose task one-hot says `unknown` (as prompts without a task arrive)."""
    from controller.guarantee.guard import as_unknown_task
    return dataclasses.replace(arrays, features=as_unknown_task(arrays.features).astype(arrays.features.dtype))


def _metrics(policy, calibration, arrays) -> dict:
    from controller.learning.evaluate import policy_metrics
    m = policy_metrics(arrays, calibration.decide(policy.scores(arrays.features), arrays.n_tokens))
    return {k: m[k] for k in ("violation_rate", "violation_ci95", "compute_saved", "dense_requests")}


def live_zero_shot(policy, guard, levels, calibration, ev, alarm_at, alpha: float, delta: float,
                   p: float, p_shift: float) -> dict:
    """Zero shot behind the live certificate (`controller.guarantee.risk.simulate_live`): the guard's
    per-request fallback, shadow labels on a share p of the stream (p_shift from the request at
    which the shift monitor alarmed), dense from the request after the lower bound passes alpha;
    the stream in the order `monitor_stream` uses (seed 0)."""
    from controller.learning.evaluate import policy_metrics
    from controller.guarantee.guard import Guarded
    from controller.guarantee.risk import simulate_live
    chosen = calibration.decide(Guarded(policy, guard, levels).scores(ev.features), ev.n_tokens)
    order = np.random.default_rng(0).permutation(len(ev))
    served, state = simulate_live(chosen[order], ev.label_index[order], alpha, delta, p, 0, p_shift, alarm_at)
    out = np.empty_like(chosen)
    out[order] = served
    m = policy_metrics(ev, out)
    return {"unsafe": m["violation_rate"], "saving": m["compute_saved"], "p": p, "p_shift": p_shift,
            "shift_warned_at": alarm_at, "fell_back_at": state["harmful_at"], "shadow_labels": state["shadow_labels"],
            "lower": state["lower"]}


LADDER = (0.0, 0.05, 0.1, 0.2)   # score-threshold offsets a live ladder may certify


def rung_levels(calibration, scores: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """[n, rungs] the level index each LADDER offset chooses per request."""
    return np.stack([calibration.decide(scores, n_tokens, offset=o) for o in LADDER], axis=1)


def live_ladder(policy, guard, levels, calibration, ev, alpha: float, delta: float, p: float) -> dict:
    """Zero shot with the threshold moving on live labels (`controller.guarantee.risk.simulate_ladder`): behind
    the guard's per-request fallback, each rung's choices replayed in the `live_zero_shot` order."""
    from controller.learning.evaluate import policy_metrics
    from controller.guarantee.guard import Guarded
    from controller.guarantee.risk import simulate_ladder
    rungs = rung_levels(calibration, Guarded(policy, guard, levels).scores(ev.features), ev.n_tokens)
    order = np.random.default_rng(0).permutation(len(ev))
    served, state = simulate_ladder(rungs[order], ev.label_index[order], alpha, delta, p, LADDER)
    out = np.empty(len(ev), dtype=int)
    out[order] = served
    m = policy_metrics(ev, out)
    return {"unsafe": m["violation_rate"], "saving": m["compute_saved"], "p": p, "final_rung": state["deployed"],
            "moves": state["moves"], "labels": state["labels"]}


def reweighed(policy, ckpt, train_arrays, ev, alpha: float, delta: float) -> dict:
    """Recertified without the group's labels: the checkpoint's own calibration requests reweighed
    toward the group's features (`controller.guarantee.weighted`), evaluated on the group; or why it refused."""
    from controller.learning.evaluate import policy_metrics
    from controller.learning.pipeline import _splits
    from controller.guarantee.recalibrate import min_requests
    from controller.guarantee.weighted import density_ratios, weighted_calibrate
    cal = hide_task(train_arrays.subset(_splits(train_arrays, ckpt.record["split"])["calibration"]))
    try:
        w, info = density_ratios(cal.features, ev.features)
        c = weighted_calibrate(policy, cal, w, alpha, delta, min_requests(alpha, delta))
    except UserError as e:
        return {"refused": str(e)}
    m = policy_metrics(ev, c.decide(policy.scores(ev.features)))
    return {"unsafe": m["violation_rate"], "saving": m["compute_saved"], "passed": c.passed, **info}


def recalibration_draws(ckpt, policy, fam, n_cal: int, job, crit: dict, repeats: int) -> dict:
    """Recalibrate on `repeats` random draws of `n_cal` of the family's requests, evaluate each on the
    rest: how often the violation rate exceeds alpha (Learn-then-Test allows delta of the draws)."""
    from controller.learning.evaluate import policy_metrics
    from controller.guarantee.guard import Guarded
    from controller.runtime.policy import deployed_policy
    from controller.guarantee.recalibrate import recalibrate
    viol, saved, share = [], [], []
    for seed in range(1, repeats + 1):
        order = np.random.default_rng(seed).permutation(len(fam))
        cal, ev = fam.subset(order[:n_cal]), fam.subset(order[n_cal:])
        r = recalibrate(ckpt, cal, job.calibration.alpha, job.calibration.delta, crit, {"source": "draw"})
        m = _metrics(Guarded(deployed_policy(ckpt.net, ckpt.levels, r.record), r.guard, ckpt.levels), r.calibration, ev)
        oracle = policy_metrics(ev, ev.label_index)["compute_saved"]
        viol.append(m["violation_rate"])
        saved.append(m["compute_saved"])
        share.append(m["compute_saved"] / oracle if oracle > 0 else np.nan)
    return {"draws": repeats, "violation_mean": float(np.mean(viol)), "violation_max": float(np.max(viol)),
            "share_above_alpha": float(np.mean(np.array(viol) > job.calibration.alpha)),
            "compute_saved_mean": float(np.mean(saved)), "share_of_oracle_mean": float(np.nanmean(share))}


def run_group(job, arrays, meta, labels: str, group: str, n_cal: int, workdir: Path, repeats: int = 0,
               by: str = "family") -> dict:
    from controller.learning.evaluate import policy_metrics
    from controller.runtime.checkpoint import load_checkpoint
    from controller.guarantee.guard import Guarded, Monitored, two_sample_test
    from controller.learning.pipeline import train_on_arrays
    from controller.guarantee.calibrate import calibrate
    from controller.learning.evaluate import separability
    from controller.runtime.policy import LearnedPolicy, MassCoveragePolicy, deployed_policy, recall_columns
    from controller.guarantee.recalibrate import recalibrate
    from data.store import criterion_dict
    held = in_group(arrays, by, group)
    if held.sum() <= n_cal or (~held).sum() < 50:
        raise ValueError(f"group {by}={group} has {int(held.sum())} requests and leaves {int((~held).sum())}; "
                         f"need more than {n_cal} held out and 50 to train on")
    trained = train_on_arrays(dataclasses.replace(job, out=str(workdir / group)), arrays.subset(np.flatnonzero(~held)),
                              meta, labels)
    ckpt = load_checkpoint(trained.checkpoint)
    grp = hide_task(arrays.subset(np.flatnonzero(held)))
    order = np.random.default_rng(0).permutation(len(grp))
    cal, ev = grp.subset(order[:n_cal]), grp.subset(order[n_cal:])
    policy = deployed_policy(ckpt.net, ckpt.levels, ckpt.record)
    guard = ckpt.guard
    monitored = Monitored(policy, guard, ckpt.levels)
    zero = _metrics(monitored, ckpt.calibration, ev)
    zero["flagged_share"] = float(guard.check(ev.features)[0].mean())
    zero["monitor"] = monitored.last_monitor
    guard_only = _metrics(Guarded(policy, guard, ckpt.levels), ckpt.calibration, ev)
    zero["two_sample"] = two_sample_test(guard.reference, guard.standardise(ev.features))
    unguarded = _metrics(policy, ckpt.calibration, ev)
    weighted = reweighed(policy, ckpt, arrays.subset(np.flatnonzero(~held)), ev, job.calibration.alpha,
                         job.calibration.delta)
    alarm_at = (monitored.last_monitor or {}).get("alarm_at")
    live = {f"p{p:g}": {**live_zero_shot(policy, guard, ckpt.levels, ckpt.calibration, ev, alarm_at,
                                         job.calibration.alpha, job.calibration.delta, p, max(p, 0.5)),
                        "unguarded_unsafe": unguarded["violation_rate"], "unguarded_saving": unguarded["compute_saved"],
                        "ladder": live_ladder(policy, guard, ckpt.levels, ckpt.calibration, ev, job.calibration.alpha,
                                              job.calibration.delta, p)}
            for p in (0.05, 0.2, 1.0)}
    crit = criterion_dict(job.criterion)
    r = recalibrate(ckpt, cal, job.calibration.alpha, job.calibration.delta, crit, {"source": f"{group} held out"})
    recal = _metrics(Guarded(deployed_policy(ckpt.net, ckpt.levels, r.record), r.guard, ckpt.levels), r.calibration, ev)
    recal["policy"] = r.record["policy"]
    recal["flagged_share"] = float(r.guard.check(ev.features)[0].mean())
    recal["threshold_passed"] = r.calibration.passed
    oracle = policy_metrics(ev, ev.label_index)["compute_saved"]
    recal["share_of_oracle"] = recal["compute_saved"] / oracle if oracle > 0 else None
    recal["auc_p_safe"] = separability(LearnedPolicy(ckpt.net), ev)
    mass = None
    if recall_columns(ckpt.levels) is not None:
        mc = MassCoveragePolicy(ckpt.levels)
        mass = _metrics(mc, calibrate(mc, cal, job.calibration.alpha, job.calibration.delta, mode=job.calibration.mode), ev)
    draws = recalibration_draws(ckpt, policy, grp, n_cal, job, crit, repeats) if repeats else None
    return {"family": group, "by": by, "tasks": sorted(set(grp.tasks)), "n_train_store": int((~held).sum()), "draws": draws,
            "n_calibration": len(cal), "n_evaluated": len(ev), "oracle_compute_saved": oracle,
            "in_distribution_calibration": ckpt.calibration.to_json(), "zero_shot": zero, "zero_shot_guard_only": guard_only,
            "zero_shot_unguarded": unguarded, "zero_shot_live": live["p0.05"], "zero_shot_live_p02": live["p0.2"],
            "zero_shot_live_p1": live["p1"],
            "recalibrated": recal, "reweighed": weighted, "mass_coverage_recalibrated": mass}


def table(rows: list[dict], alpha: float) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    lines = [f"| held-out {rows[0]['by']} | cal / eval requests | zero shot, guard + monitor: violation / saved / "
             "flagged / monitor alarm at request | zero shot, guard only: violation / saved | "
             "zero shot, two-sample p | zero shot, no guard: violation / saved | recalibrated (deployed policy): "
             "violation (95% CI) / saved / share of oracle | oracle saved |", "|" + "---|" * 8]
    for r in rows:
        z, u, c = r["zero_shot"], r["zero_shot_unguarded"], r["recalibrated"]
        g = r.get("zero_shot_guard_only") or z
        alarm = (z.get("monitor") or {}).get("alarm_at")
        lo, hi = c["violation_ci95"]
        lines.append(f"| {r['family']} | {r['n_calibration']} / {r['n_evaluated']} | {pct(z['violation_rate'])} / "
                     f"{pct(z['compute_saved'])} / {pct(z['flagged_share'])} / {alarm or 'none'} | "
                     f"{pct(g['violation_rate'])} / {pct(g['compute_saved'])} | {z['two_sample']['p_value']:.2g} | "
                     f"{pct(u['violation_rate'])} / {pct(u['compute_saved'])} | ({c['policy']}) {pct(c['violation_rate'])} "
                     f"({pct(lo)}-{pct(hi)}) / {pct(c['compute_saved'])} / {pct(c['share_of_oracle'])} | "
                     f"{pct(r['oracle_compute_saved'])} |")
    if any("zero_shot_live" in r for r in rows):
        lines += ["", f"| held-out {rows[0]['by']} | zero shot, live certificate p 0.05 (0.5 after a shift warning): "
                  "violation / saved / shadow labels / fell back at request | the same at p 0.2 |", "|---|---|---|"]
        for r in rows:
            cells = [f"{pct(v['unsafe'])} / {pct(v['saving'])} / {v['shadow_labels']} / {v['fell_back_at'] or 'never'}"
                     for v in (r.get("zero_shot_live"), r.get("zero_shot_live_p02")) if v]
            lines.append(f"| {r['family']} | " + " | ".join(cells) + " |")
    if any("ladder" in (r.get("zero_shot_live") or {}) for r in rows):
        lines += ["", f"| held-out {rows[0]['by']} | threshold ladder {LADDER} on live labels, p 0.05: violation / saved / "
                  "rung at the end | p 0.2 | p 1 (every request labeled) |", "|---|---|---|---|"]
        for r in rows:
            cells = [f"{pct(v['ladder']['unsafe'])} / {pct(v['ladder']['saving'])} / {v['ladder']['final_rung']}"
                     for v in (r.get("zero_shot_live"), r.get("zero_shot_live_p02"), r.get("zero_shot_live_p1")) if v]
            lines.append(f"| {r['family']} | " + " | ".join(cells) + " |")
    if any("reweighed" in r for r in rows):
        lines += ["", f"| held-out {rows[0]['by']} | reweighed, no labels of the group: violation / saved / "
                  "effective size / classifier AUC (or why refused) |", "|---|---|"]
        for r in rows:
            v = r["reweighed"]
            lines.append(f"| {r['family']} | " + (v["refused"] if "refused" in v else
                         f"{pct(v['unsafe'])} / {pct(v['saving'])} / {v['effective_size']:.0f} of {v['n']} / {v['auc']:.2f}") + " |")
    lines += ["", f"| held-out {rows[0]['by']} | AUC of P(safe) per level (min-max) | mass-coverage baseline, recalibrated: violation / saved |",
              "|---|---|---|"]
    for r in rows:
        aucs = [v for v in r["recalibrated"]["auc_p_safe"].values() if v is not None]
        mc = r.get("mass_coverage_recalibrated")
        lines.append(f"| {r['family']} | " + (f"{min(aucs):.2f}-{max(aucs):.2f}" if aucs else "-") + " | "
                     + (f"{pct(mc['violation_rate'])} / {pct(mc['compute_saved'])}" if mc else "-") + " |")
    lines += ["", f"| held-out {rows[0]['by']} | recalibration draws | mean violation | max violation | draws above alpha | "
              "mean saved | mean share of oracle |", "|" + "---|" * 7]
    for r in rows:
        d = r.get("draws")
        if d:
            lines.append(f"| {r['family']} | {d['draws']} | {pct(d['violation_mean'])} | {pct(d['violation_max'])} | "
                         f"{pct(d['share_above_alpha'])} | {pct(d['compute_saved_mean'])} | {pct(d['share_of_oracle_mean'])} |")
    return "\n".join(lines) + f"\n\nalpha = {alpha}; violations judged by the criterion the controller was calibrated under.\n"


def main(argv=None) -> int:
    from controller.learning.config import ControllerJobConfig
    from controller.learning.dataset import arrays_from_stores
    from controller.learning.pipeline import versions
    from data.config import load_config
    from data.store import write_text_atomic
    p = ArgumentParser(prog="python -m controller.holdout", description=doc_summary(__doc__))
    p.add_argument("--config", default="configs/demo_smollm2.yaml")
    p.add_argument("--out", required=True, help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--by", default="family", choices=list(GROUPINGS), help="what a held-out group is")
    p.add_argument("--groups", "--families", nargs="+", help="which groups to hold out (default: all of --by)")
    p.add_argument("--calibration-requests", type=int, default=200)
    p.add_argument("--repeats", type=int, default=20, help="random calibration draws per family (0: only the first)")
    p.add_argument("--also", action="append", default=[], metavar="STORE",
                   help="another label store labeled alike (e.g. data/labels/smollm2-135m/natural), joined to the "
                        "config's; repeat for more")
    p.add_argument("--keep", help="keep each family's checkpoint under KEEP/FAMILY/checkpoint (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (default adds criterion.name=fidelity)")
    args = p.parse_args(argv)
    groups = args.groups or []
    bad = sorted(set(groups) - set(GROUPINGS[args.by]))
    if bad:
        print(f"error: unknown {args.by} group(s) {bad}; choose from {list(GROUPINGS[args.by])}", file=sys.stderr)
        return 2
    try:
        check_output_file(args.out, f"--out {args.out}")
        if args.repeats < 0 or args.calibration_requests < 1:
            raise UserError(f"--repeats must be >= 0 and --calibration-requests >= 1 (got {args.repeats} and "
                            f"{args.calibration_requests})")
        job = load_config(ControllerJobConfig, args.config, ["criterion.name=fidelity", "logging.wandb=disabled",
                                                             *args.overrides])
        if not job.labels:
            raise UserError(f"config {args.config} names no label store; add the override labels=PATH (a store made by train.py)")
        arrays, meta = arrays_from_stores([job.labels, *args.also], job.criterion)
        groups = groups or [g for g in GROUPINGS[args.by] if in_group(arrays, args.by, g).any()]   # those present
        check_groups(arrays, args.by, groups, args.calibration_requests)
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        rows = [run_group(job, arrays, meta, job.labels, g, args.calibration_requests, work, args.repeats, args.by)
                for g in groups]
    result = {"config": args.config, "by": args.by, "criterion": dataclasses.asdict(job.criterion), "alpha": job.calibration.alpha,
              "delta": job.calibration.delta, "labels": job.labels, "also": args.also, "versions": versions(),
              "families": rows}
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=1))
        write_text_atomic(out.with_suffix(".md"), table(rows, job.calibration.alpha))
    except OSError as e:   # a disk that filled up during the run: the results are lost, said in one line
        print(error_line(e), file=sys.stderr)
        return 2
    print(table(rows, job.calibration.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
