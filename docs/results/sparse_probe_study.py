"""Study: what running the probe layers sparse buys end to end (speed part; GPU only).

Layers 0-1 run dense and probed in the shipped configuration, which caps level 0.9 at ~2.99x at
64K (LOG.md, Amdahl bounds). Since the probes read a layer's queries and keys before its attention
(`sparse_kernels.probe_layers_problem`), the last probe layer may run sparse at the decided level.
Three plans, in one alternation per length with dense SDPA (the host's speed drifts):
- `dense01`: layers 0-1 dense, both probed (shipped; store v2's labels);
- `dense0`: layer 0 dense; layer 1 probed, then run at the level (the same features);
- `dense_none`: no dense layer; layer 0 probed, then run at the level (features from layer 0 only:
  the shipped net reads other inputs, so its decisions here are for timing only).
Per plan and level: `forced` (the level set before the forward, no probe, no decision) and
`decision` (through the hook, probes and net, the level forced after the decision).
`--overhead`: plans `dense01` and `dense_none` at level 0.9 only, and also `decision_no_text`: the
decision with the token-id statistics looked up instead of computed (what the decision costs
when it does not wait for them).

  python docs/results/sparse_probe_study.py --checkpoint runs/demo/checkpoint --out F.json [--overhead]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from controller.experiments.benchmark import _measure_alternating, _past_warmup, _prompt, _versions
from controller.runtime.checkpoint import load_checkpoint
from controller.runtime.hook import attach
from data.models import load_model
from sparse_kernels import SparsePlan, use_plan

PLANS = {"dense01": ({0, 1}, {0, 1}), "dense0": ({0}, {0, 1}), "dense_none": (set(), {0})}
LEVELS = (0.9, 0.95)
LENGTHS = (32768, 65536, 131072)
ROUNDS = 3


@contextlib.contextmanager
def _hooked(handle, dense, probes, level):
    saved = handle.dense_layers, handle.probe_layers
    handle.dense_layers, handle.probe_layers, handle.force_level = frozenset(dense), frozenset(probes), level
    try:
        yield
    finally:
        (handle.dense_layers, handle.probe_layers), handle.force_level = saved, None


def _forced(handle, call, dense, level):
    def run():
        plan = SparsePlan(levels=torch.full((1,), level, dtype=torch.float64), selection=handle.selection,
                          dense_layers=frozenset(dense), backend=handle.backend)
        with use_plan(plan):
            return call()
    return run


@contextlib.contextmanager
def _text_looked_up(handle, d, p, lv, known: dict):
    """The hook's token-id statistics returned from `known` (computed once, outside the timing)."""
    import controller.runtime.hook as hook
    original = hook.text_statistics
    def looked_up(ids):
        key = ids.tobytes()
        if key not in known:
            known[key] = original(ids)
        return known[key]
    hook.text_statistics = looked_up
    try:
        with _hooked(handle, d, p, lv):
            yield
    finally:
        hook.text_statistics = original


def _modes(handle, call, overhead: bool):
    modes, known = {"dense": (call, handle.detached)}, {}
    for name, (dense, probes) in PLANS.items():
        if overhead and name == "dense0":
            continue
        for level in LEVELS[:1] if overhead else LEVELS:
            modes[(name, level, "forced")] = (_forced(handle, call, dense, level), handle.paused)
            modes[(name, level, "decision")] = (call, lambda d=dense, p=probes, lv=level: _hooked(handle, d, p, lv))
            if overhead:
                modes[(name, level, "decision_no_text")] = (
                    call, lambda d=dense, p=probes, lv=level: _text_looked_up(handle, d, p, lv, known))
    return modes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--overhead", action="store_true")
    args = p.parse_args()
    cuda = args.device == "cuda"
    lm = load_model("smollm2-135m", dtype="bfloat16" if cuda else "float32", device=args.device)
    ckpt = load_checkpoint(args.checkpoint)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "versions": _versions(), "plans": {k: [sorted(d), sorted(q)]
              for k, (d, q) in PLANS.items()}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rounds": ROUNDS, "rows": []}
    with attach(lm, ckpt, break_even=None) as handle:
        handle.dispatch = False
        for n in (int(x) for x in args.lengths.split(",")):
            ids = _prompt(lm.tokenizer, n, lm.model.config.vocab_size, args.device)
            call = lambda ids=ids: lm.model(input_ids=ids, logits_to_keep=1)  # noqa: E731
            rounds = []
            for _ in range(ROUNDS):
                _past_warmup(handle)
                rounds.append(_measure_alternating(_modes(handle, call, args.overhead), n))
            med = {k: sorted(r[k][0] for r in rounds)[ROUNDS // 2] for k in rounds[0]}
            for name, level, _ in [k for k in med if k != "dense" and k[2] == "forced"]:
                f, d = med[(name, level, "forced")], med[(name, level, "decision")]
                row = {"N": n, "plan": name, "level": level, "ms_dense": round(med["dense"], 3),
                       "ms_forced": round(f, 3), "ms_decision": round(d, 3), "speedup_forced": round(med["dense"] / f, 3),
                       "speedup_decision": round(med["dense"] / d, 3), "decision_overhead_ms": round(d - f, 3)}
                if (name, level, "decision_no_text") in med:
                    row["decision_overhead_no_text_ms"] = round(med[(name, level, "decision_no_text")] - f, 3)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
