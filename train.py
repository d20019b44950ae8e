"""Run the controller job from a YAML config: label (or reuse a label store) -> train ->
calibrate -> export -> evaluate. Prints the report folder as its last line.

With `stages: [label]` it only labels: it writes (or resumes) the store under `labeling.out`,
prints its safe-fraction table, writes the length finding into the store and prints its path.

Examples:
  python train.py --config configs/demo_smollm2.yaml                  # committed labels, CPU, minutes
  python train.py --config configs/demo_smollm2.yaml calibration.alpha=0.1 out=runs/a10
  python train.py --config configs/demo_smollm2.yaml --overwrite      # replace runs/demo/checkpoint
  python train.py --config configs/label_smollm2_gpu.yaml labeling.devices=2   # label on 2 GPUs
Errors in the input print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controller.runtime.compat import check_switches
from controller.learning.config import ControllerJobConfig
from data.config import config_keys_help, load_config
from data.errors import ArgumentParser, UserError, error_line, doc_summary


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=doc_summary(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (YAML sections, or dotted overrides key=value), with defaults:\n"
                                       + config_keys_help(ControllerJobConfig))
    p.add_argument("--config", required=True, help="YAML file in configs/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT/checkpoint and OUT/report (refused otherwise; only ones this project wrote)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out=runs/x calibration.alpha=0.1")
    return p.parse_args(argv)


def check_out(job: ControllerJobConfig, overwrite: bool) -> None:
    """Every path the job writes, before anything is written: `out` new, empty or a run folder of
    ours; its checkpoint and report replaced only with --overwrite and only when they are ours; the
    label store new, empty or a store to resume, never inside what a rerun replaces."""
    from data.outputs import check_disjoint, check_replaceable, check_run_folder, check_store_target, relation
    store = job.labels if job.labels is not None else job.labeling.out
    if "train" in job.stages:
        out = Path(job.out)
        if relation(out, store) in ("is", "lies inside"):
            raise UserError(f"out={job.out} {relation(out, store)} the label store {store}; choose another out=DIR")
        check_run_folder(out, f"out={job.out}", store)
        check_disjoint(store, f"label store {store}", {"the run's checkpoint folder": out / "checkpoint",
                                                        "the run's report folder": out / "report", "the run's logs": out / "logs"})
        check_replaceable(out / "checkpoint", f"{out / 'checkpoint'}", "checkpoint", overwrite)
        if "evaluate" in job.stages:
            check_replaceable(out / "report", f"{out / 'report'}", "report", overwrite)
    if "label" in job.stages or job.labels is None:   # labels are written into labeling.out
        check_store_target(job.labeling.out, f"labeling.out={job.labeling.out}")


def save_resolved_config(job: ControllerJobConfig) -> None:
    """The config as run (file + overrides + defaults), beside the run's outputs."""
    import dataclasses
    import json
    import yaml
    from data.store import write_text_atomic
    Path(job.out).mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(dataclasses.asdict(job)))   # tuples -> lists, as YAML writes them
    write_text_atomic(Path(job.out) / "config.resolved.yaml", yaml.safe_dump(plain, sort_keys=False))


def label_only(job: ControllerJobConfig) -> str | None:
    from data.figures import write_length_finding
    from data.report import print_summary
    from data.runner import run_labeling
    store = run_labeling(job.label_job())
    if store is None:  # a non-zero rank of a distributed run: rank 0 reports
        return None
    from data.errors import UserError
    try:   # the labels are written either way: a criterion these rows cannot judge yet is a note, not a failure
        print_summary(store, job.criterion)
        for path in write_length_finding(store, job.criterion):
            print(f"wrote {path}")
    except UserError as e:
        print(f"note: labels kept; no summary under the config's criterion: {e}")
    return str(store.root)


def run(job: ControllerJobConfig) -> str | None:
    if "train" not in job.stages:
        return label_only(job)
    from controller.learning.dataset import arrays_from_store
    from controller.learning.pipeline import checked_splits, evaluate_checkpoint, resolve_labels, train_on_arrays
    from dataclasses import replace
    labels = resolve_labels(job)
    if labels is None:   # a non-zero rank of the labeling run: its share is written; rank 0 trains
        return None
    arrays, meta = arrays_from_store(labels, job.criterion)
    checked_splits(job, arrays, labels)   # a store too small for the splits is refused before anything is written
    save_resolved_config(job)
    checkpoint = train_on_arrays(replace(job, labels=labels), arrays, meta, labels).checkpoint
    print(f"checkpoint: {checkpoint}")
    if "evaluate" not in job.stages:
        return str(checkpoint)
    report = evaluate_checkpoint(str(checkpoint), str(Path(job.out) / "report"), labels=labels)
    print((report / "report.md").read_text().split("## Per task")[0])
    return str(report)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_switches()
        job = load_config(ControllerJobConfig, args.config, args.overrides)
        check_out(job, args.overwrite)
        result = run(job)
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
