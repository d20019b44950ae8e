"""Evaluate a controller checkpoint and every baseline policy; write report.md, metrics.json
and figures into --out, and print that folder as the last line.

  python eval.py --checkpoint runs/demo/checkpoint --labels data/labels/smollm2-135m/v1 --out runs/demo/eval
  python eval.py --checkpoint runs/demo/checkpoint --ruler path/to/ruler_dir --out runs/ruler_eval
  python eval.py --checkpoint runs/mine/checkpoint --prompts my_prompts.jsonl --out runs/mine/eval  # label-free

--labels evaluates on that label store's test split; --ruler labels a RULER-format JSONL file (or
every *.jsonl under a folder) with the checkpoint's model and settings first; --prompts does the
same for prompts without answers (judged by the label-free `fidelity` criterion). Baselines are
fitted on the checkpoint's training store and calibrated on the requests the checkpoint was
calibrated on. The report says which criterion judged the violations, what share of the requests
the shift guard flagged, and whether the traffic looks exchangeable with the calibration requests.
Where a benchmark of the checkpoint's model exists (--timings, or the newest under sparse_kernels/bench),
the report leads with wall-clock prefill time saved at each policy's decisions, per length.
An existing --out is refused unless --overwrite is given, and even then only a report this project
wrote is replaced (a folder holding only the labels of an interrupted run is resumed); --out may not
be, contain or lie inside the checkpoint, its label stores or the evaluated inputs.
Errors print one line, exit with code 2 and leave nothing written.
"""
from __future__ import annotations

import argparse
import sys

from data.errors import ArgumentParser, UserError, error_line, doc_summary


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder written by train.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="a label store (its test split is evaluated)")
    src.add_argument("--ruler", help="a RULER JSONL file or a folder of them (searched recursively)")
    src.add_argument("--prompts", help="prompts without answers: JSONL file or folder, or a folder of .txt files")
    p.add_argument("--criterion", choices=["gold", "fidelity", "divergence"],
                   help="criterion that judges violations (default: the checkpoint's; --prompts needs a label-free one: "
                        "the checkpoint's if it is label-free, else fidelity)")
    p.add_argument("--timings", help="a benchmark JSON (sparse_kernels/bench/*.json) that prices decisions in wall-clock "
                                      "time (default: the newest one recorded for the checkpoint's model, if any)")
    p.add_argument("--out", required=True, help="report folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report at --out (only a report this project wrote)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from controller.runtime.compat import check_switches
        from controller.learning.pipeline import check_report_paths, evaluate_checkpoint
        check_switches()
        check_report_paths(args.out, args.checkpoint, args.overwrite, labels=args.labels, ruler=args.ruler,
                           prompts=args.prompts)
        criterion = args.criterion
        if args.prompts and criterion is None:
            from controller.runtime.checkpoint import load_checkpoint
            own = load_checkpoint(args.checkpoint).record["criterion"].get("name", "gold")
            criterion = own if own in ("fidelity", "divergence") else "fidelity"
        out = evaluate_checkpoint(args.checkpoint, args.out, labels=args.labels, ruler=args.ruler,
                                  prompts=args.prompts, criterion=criterion, timings=args.timings)
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    print((out / "report.md").read_text().split("## Per task")[0])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
