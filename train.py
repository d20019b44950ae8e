"""Run the pipeline from a YAML config: label the model's requests at every sparsity level.

Today this runs the labeling stage (the controller stages come with the controller issue):
it writes (or resumes) a label store under `labeling.out`, prints its safe-fraction table and
writes the length finding (label_vs_length.md / .png) into the store.

Examples:
  python train.py --config configs/demo_smollm2.yaml
  python train.py --config configs/label_smollm2_cpu.yaml labeling.out=runs/labels/x data.seed=3
  python train.py --config configs/label_smollm2_gpu.yaml labeling.devices=2   # DDP on 2 GPUs
Errors in the input print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys

from data.config import LabelJobConfig, load_config
from data.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. labeling.out=runs/x data.seed=1")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        job = load_config(LabelJobConfig, args.config, args.overrides)
        from data.runner import run_labeling
        from data.report import print_summary
        store = run_labeling(job)
        if store is None:  # a non-zero rank of a distributed run: rank 0 reports
            return 0
        print_summary(store, job.criterion)
        from data.figures import write_length_finding
        for path in write_length_finding(store, job.criterion):
            print(f"wrote {path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(store.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
