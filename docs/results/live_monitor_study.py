"""How the live certificate behaves: false alarms on exchangeable streams, requests to fall back on a
harmful one, and zero-shot held-out groups behind it (issue 29). Writes live_monitor.json + .md.

  python docs/results/live_monitor_study.py --holdout docs/results/holdout_family.json \
      --out docs/results/live_monitor.json

- `false_alarm_rate`: streams whose violations are exchangeable at rate exactly alpha (the worst
  the promise allows; `n_streams` of `labels_per_stream` shadow labels): the share that ever falls
  back. Also on the make-demo checkpoint's own test requests (store v2, judged by gold), replayed in
  seeded random orders: `store_false_alarm_rate`.
- `detect_requests`: the median number of requests until the fallback on a stream at 2 x alpha,
  for p = 0.05 (and the other shares in `detect_by_p`).
- `holdout`: per held-out group of `--holdout` (a controller.holdout JSON with `live` rows).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.guarantee.risk import LiveRisk, simulate_live  # noqa: E402
from data.store import write_text_atomic  # noqa: E402


def false_alarms(alpha: float, delta: float, streams: int, labels: int) -> float:
    alarms = 0
    for seed in range(streams):
        risk, rng = LiveRisk(alpha, delta, p=1.0), np.random.default_rng(seed)
        for x in rng.uniform(size=labels) < alpha:
            if risk.observe(bool(x)):
                alarms += 1
                break
    return alarms / streams


def detect_requests(alpha: float, delta: float, p: float, streams: int, horizon: int = 400_000) -> dict:
    """Requests until the fallback on streams violating at 2 x alpha (every decision sparse)."""
    waits = []
    for seed in range(streams):
        rng = np.random.default_rng(10_000 + seed)
        gaps = rng.geometric(p, size=horizon // 10)       # requests between shadow labels
        violated = rng.uniform(size=len(gaps)) < 2 * alpha
        risk, t = LiveRisk(alpha, delta, p=1.0), 0
        for gap, v in zip(gaps, violated):
            t += int(gap)
            if risk.observe(bool(v)):
                break
        waits.append(t if risk.harmful else None)
    done = [w for w in waits if w is not None]
    return {"p": p, "median_requests": float(np.median(done)) if done else None,
            "p90_requests": float(np.percentile(done, 90)) if done else None, "fell_back": len(done), "streams": streams}


def store_false_alarms(checkpoint: str, store: str, alpha: float, delta: float, p: float, streams: int,
                       length: int) -> dict:
    """The checkpoint's own decisions on its store's test split, replayed as long seeded streams."""
    from controller.learning.dataset import arrays_from_store
    from controller.runtime.checkpoint import load_checkpoint
    from controller.learning.pipeline import _splits
    from controller.runtime.policy import deployed_policy
    ckpt = load_checkpoint(checkpoint)
    arrays, _ = arrays_from_store(store, ckpt.record["criterion"])
    test = arrays.subset(_splits(arrays, ckpt.record["split"])["test"])
    policy = deployed_policy(ckpt.net, ckpt.levels, ckpt.record)
    chosen = ckpt.calibration.decide(policy.scores(test.features), test.n_tokens)
    rate = float((chosen > test.label_index).mean())
    alarms = 0
    for seed in range(streams):
        order = np.random.default_rng(seed).integers(0, len(test), size=length)   # exchangeable draws
        _, state = simulate_live(chosen[order], test.label_index[order], alpha, delta, p, seed)
        alarms += state["harmful_at"] is not None
    return {"test_requests": len(test), "violation_rate": rate, "streams": streams, "requests_per_stream": length,
            "p": p, "false_alarm_rate": alarms / streams}


def ladder_streams(checkpoint: str, store: str, alpha: float, delta: float, p: float, streams: int,
                   length: int) -> dict:
    """The threshold ladder (controller.holdout.LADDER) on the checkpoint's test decisions, replayed as
    long exchangeable streams: where it ends, when it first moves, and what it serves against the
    fixed calibrated threshold."""
    from controller.learning.dataset import arrays_from_store
    from controller.learning.evaluate import policy_metrics
    from controller.runtime.checkpoint import load_checkpoint
    from controller.experiments.holdout import LADDER, rung_levels
    from controller.learning.pipeline import _splits
    from controller.runtime.policy import deployed_policy
    from controller.guarantee.risk import simulate_ladder
    ckpt = load_checkpoint(checkpoint)
    arrays, _ = arrays_from_store(store, ckpt.record["criterion"])
    test = arrays.subset(_splits(arrays, ckpt.record["split"])["test"])
    scores = deployed_policy(ckpt.net, ckpt.levels, ckpt.record).scores(test.features)
    rungs = rung_levels(ckpt.calibration, scores, test.n_tokens)
    rates = [float((rungs[:, k] > test.label_index).mean()) for k in range(len(LADDER))]
    saved = [policy_metrics(test, rungs[:, k])["compute_saved"] for k in range(len(LADDER))]
    runs = []
    for seed in range(streams):
        order = np.random.default_rng(seed).integers(0, len(test), size=length)
        served, state = simulate_ladder(rungs[order], test.label_index[order], alpha, delta, p, LADDER, seed)
        m = policy_metrics(test.subset(order), served)
        runs.append({"final_rung": state["deployed"], "unsafe": m["violation_rate"], "saving": m["compute_saved"],
                     "first_move_request": state["moved_at_request"][0] if state["moved_at_request"] else None})
    firsts = [r["first_move_request"] for r in runs if r["first_move_request"] is not None]
    return {"offsets": list(LADDER), "rung_violation_rate": rates, "rung_saving": saved, "p": p, "streams": streams,
            "requests_per_stream": length, "final_rungs": [r["final_rung"] for r in runs],
            "median_requests_to_first_move": float(np.median(firsts)) if firsts else None,
            "unsafe_mean": float(np.mean([r["unsafe"] for r in runs])),
            "unsafe_max": float(np.max([r["unsafe"] for r in runs])),
            "saving_mean": float(np.mean([r["saving"] for r in runs])), "fixed_threshold_saving": saved[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--labels-per-stream", type=int, default=2000)
    ap.add_argument("--checkpoint", default="runs/demo/checkpoint")
    ap.add_argument("--store", default="data/labels/smollm2-135m/v2")
    ap.add_argument("--holdout", action="append", default=[],
                    help="a controller.holdout JSON whose groups carry `zero_shot_live` rows (repeat for more)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    a, d = args.alpha, args.delta
    doc = {"alpha": a, "delta": d, "n_streams": args.streams, "labels_per_stream": args.labels_per_stream,
           "false_alarm_rate": false_alarms(a, d, args.streams, args.labels_per_stream)}
    by_p = [detect_requests(a, d, p, 200) for p in (0.05, 0.2, 1.0)]
    doc["detect_requests"] = by_p[0]["median_requests"]
    doc["detect_by_p"] = by_p
    doc["store_streams"] = store_false_alarms(args.checkpoint, args.store, a, d, 0.05, 200, 20_000)
    doc["ladder_streams"] = [ladder_streams(args.checkpoint, args.store, a, d, p, 20, 20_000) for p in (0.05, 0.2)]
    if args.holdout:
        rows = [r for path in args.holdout for r in json.loads(Path(path).read_text())["families"]]
        doc["holdout"] = [{"group": r["family"], **r["zero_shot_live"]} for r in rows if "zero_shot_live" in r]
        doc["recalibrated"] = [{"group": r["family"], "unsafe": r["recalibrated"]["violation_rate"],
                                "saving": r["recalibrated"]["compute_saved"], "oracle_saving": r["oracle_compute_saved"]}
                               for r in rows]
        doc["holdout_source"] = args.holdout
    out = Path(args.out)
    write_text_atomic(out, json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("holdout", "recalibrated")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
