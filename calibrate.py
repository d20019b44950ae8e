"""Calibrate a trained controller on your own traffic: label your prompts with the checkpoint's
model (no answers needed under the default `divergence` criterion), re-run Learn-then-Test on them, fit a
shift guard on them, and write a new checkpoint that says what it certifies. Prints that in one
line, then the new checkpoint folder as the last line.

  python calibrate.py --checkpoint runs/demo/checkpoint --prompts my_prompts.jsonl --out runs/mine/checkpoint
  python calibrate.py --checkpoint C --prompts prompts_dir/ --out C2 --alpha 0.1 --max-requests 500 --devices 2

--prompts: a JSONL file (or folder of them) of {"input": ..., "answer_prefix"?: ..., "task"?: ...}
(RULER files work as they are; `outputs` optional), or a folder of .txt files, one prompt each.
The labels go to OUT.labels (resumable; --labels DIR to choose). An existing --out is refused unless
--overwrite is given, and even then only a checkpoint this project wrote is replaced; no output may
be, contain or lie inside the input checkpoint, the prompts or a label store. Errors print one line,
exit 2, and leave nothing written.
"""
from __future__ import annotations

import argparse
import sys

from data.errors import ArgumentParser, UserError, error_line, doc_summary


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder written by train.py (or calibrate.py)")
    p.add_argument("--prompts", required=True, help="JSONL file or folder, or a folder of .txt prompts")
    p.add_argument("--out", required=True, help="folder for the recalibrated checkpoint (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (only a checkpoint folder this project wrote)")
    p.add_argument("--criterion", default="divergence", choices=["divergence", "fidelity", "gold"],
                   help="divergence (default, label-free): the sparse model's next-token distributions along the dense "
                        "answer stay within dense serving noise, measured on your prompts; fidelity (label-free): the "
                        "greedy answer is unchanged; gold: needs `outputs` on every prompt")
    p.add_argument("--alpha", type=float, help="target rate of unsafe decisions (default: the checkpoint's)")
    p.add_argument("--delta", type=float, help="allowed probability that the certificate is wrong (default: the checkpoint's)")
    p.add_argument("--max-requests", type=int, help="label at most this many prompts (a seeded choice)")
    p.add_argument("--labels", help="label store folder (default: OUT.labels); rerunning resumes it")
    p.add_argument("--devices", type=int, default=1, help="GPUs to label on (DDP)")
    p.add_argument("--batch-samples", type=int, default=8, help="prompts decoded together while labeling")
    p.add_argument("--model", help="the model to label with (default: the checkpoint's; must have the same weights)")
    p.add_argument("--policy", default="auto", choices=["auto", "controller", "mass_coverage", "adapted"],
                   help="policy to certify; adapted: the controller with a head refitted on half of your prompts and "
                        "certified on the other half; auto: every one that applies, each at delta/k, the one saving "
                        "most on your prompts is deployed")
    p.add_argument("--mode", choices=["ltt", "crc"],
                   help="ltt: P(unsafe rate <= alpha) >= 1 - delta; crc: E[unsafe rate] <= alpha (default: the checkpoint's)")
    p.add_argument("--guard-p", type=float, help="shift guard's conformal p-value level (default: the checkpoint's)")
    p.add_argument("--reweigh", action="store_true",
                   help="label nothing: reweigh the checkpoint's own calibration requests toward your prompts' features "
                        "(weighted Learn-then-Test; holds under covariate shift only, approximately; refused when the two "
                        "are too far apart)")
    p.add_argument("--length-strata", default="none",
                   help="'none' (default): one threshold for the mix of lengths in your prompts; token upper bounds "
                        "(e.g. 2048,8192) or 'checkpoint' (the checkpoint's): one threshold per length stratum, "
                        "each certified on its own prompts (~60-80 per stratum)")
    return p.parse_args(argv)


def _strata(text: str) -> tuple[int, ...] | None:
    """--length-strata: None (the checkpoint's), () for 'none', or the token bounds."""
    from controller.learning.config import check_strata
    if text == "checkpoint":
        return None
    if text == "none":
        return ()
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--length-strata {text!r}: give comma-separated token counts (e.g. 2048,8192), "
                        "'none' or 'checkpoint'") from None
    return check_strata(values, "--length-strata")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from controller.runtime.compat import check_switches
        check_switches()
        if args.max_requests is not None and args.max_requests < 1:
            raise UserError(f"--max-requests must be >= 1, got {args.max_requests}")
        if args.devices < 1 or args.batch_samples < 1:
            raise UserError("--devices and --batch-samples must be >= 1")
        strata = _strata(args.length_strata)
        if args.reweigh:
            from controller.guarantee.reweigh import reweigh_checkpoint
            return _print(reweigh_checkpoint(args.checkpoint, args.prompts, args.out, args.alpha, args.delta,
                                             args.max_requests, args.model, args.overwrite))
        from controller.guarantee.recalibrate import recalibrate_checkpoint
        result = recalibrate_checkpoint(args.checkpoint, args.prompts, args.out, args.criterion, args.alpha,
                                        args.delta, args.max_requests, args.labels, args.devices,
                                        args.batch_samples, args.guard_p, model=args.model, policy=args.policy,
                                        length_strata=strata, overwrite=args.overwrite, mode=args.mode)
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    return _print(result)


def _print(result) -> int:
    if result is not None:
        path, line = result
        print(line)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
