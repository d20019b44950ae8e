"""Evaluate a controller checkpoint and every baseline policy; write report.md, metrics.json
and figures into --out, and print that folder as the last line.

  python eval.py --checkpoint runs/demo/checkpoint --labels data/labels/smollm2-135m/v1 --out runs/demo/eval
  python eval.py --checkpoint runs/demo/checkpoint --ruler path/to/ruler_dir --out runs/ruler_eval

--labels evaluates on that label store's test split; --ruler labels a RULER-format JSONL file (or
every *.jsonl under a folder) with the checkpoint's model and settings first. Baselines are fitted
and calibrated on the checkpoint's own label store. Errors print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys

from data.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder written by train.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="a label store (its test split is evaluated)")
    src.add_argument("--ruler", help="a RULER JSONL file or a folder of them (searched recursively)")
    p.add_argument("--out", required=True, help="report folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from controller.pipeline import evaluate_checkpoint
        out = evaluate_checkpoint(args.checkpoint, args.out, labels=args.labels, ruler=args.ruler)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text().split("## Per task")[0])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
