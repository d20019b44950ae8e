"""The benchmark command: kernels (dense SDPA vs FlexAttention vs Triton on one block index) and
SmolLM2-135M prefill end to end with the controller hook, in one run on one GPU; writes JSON.

  python -m controller.benchmark --checkpoint runs/demo/checkpoint --out sparse_kernels/bench/h100.json

Owns `bench_end_to_end` (prefill at 2K/4K/8K: the dense model with SDPA against the hooked model
with levels forced to 0.5/0.8/0.9 on the flex and triton backends, and the decision's own cost,
features + controller, as a fraction of dense prefill) and the command line. The kernel part is
`sparse_kernels.bench`. Imports every layer below it; nothing imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

E2E_LENGTHS = (2048, 4096, 8000)
E2E_LEVELS = (0.5, 0.8, 0.9)


def _prefill_ms(model, ids, mode: str = "median") -> float:
    import triton.testing
    with torch.no_grad():
        return float(triton.testing.do_bench(lambda: model(input_ids=ids, logits_to_keep=1), warmup=25, rep=200,
                                             return_mode=mode))


def _prompt(tokenizer, length: int) -> torch.Tensor:
    from data.labeling import realize
    from data.tasks import prompt_ids
    from data.tasks.base import TaskSpec, generated_sample_id
    from data.labeling import PlannedSample
    spec = TaskSpec("niah_single")
    sample = realize(PlannedSample(generated_sample_id(spec.name, length, 0, 0), spec, length, 0, 0, True), tokenizer)
    return torch.tensor([prompt_ids(tokenizer, sample, True)], device="cuda")


def bench_end_to_end(checkpoint: str, model_name: str, log=print) -> list[dict]:
    from controller.hook import attach
    from data.models import load_model
    lm = load_model(model_name, dtype="bfloat16", device="cuda")
    rows = []
    for length in E2E_LENGTHS:
        ids = _prompt(lm.tokenizer, length)
        dense = _prefill_ms(lm.model, ids)
        with attach(lm, checkpoint, task="niah_single") as handle:
            handle.force_level = None
            with torch.no_grad():
                lm.model(input_ids=ids, logits_to_keep=1)
            decision_s = [handle.last_decision_seconds]
            handle.force_level = 0.0   # decided dense: probes + decision run, every layer then dense
            ms = _prefill_ms(lm.model, ids)
            rows.append({"N": int(ids.shape[1]), "backend": "dense (decided)", "level": 0.0,
                         "ms_dense_sdpa": round(dense, 3), "ms_hooked": round(ms, 3), "speedup": round(dense / ms, 3),
                         "achieved_sparsity": 0.0, "decision_ms": round(1e3 * handle.last_decision_seconds, 3),
                         "decision_share_of_dense": round(1e3 * handle.last_decision_seconds / dense, 4)})
            log(json.dumps(rows[-1]))
            for backend in ("flex", "triton"):
                handle.backend = backend
                for level in E2E_LEVELS:
                    handle.force_level = level
                    ms = _prefill_ms(lm.model, ids)
                    decision_s.append(handle.last_decision_seconds)
                    d = handle.last_decisions[0]
                    rows.append({"N": int(ids.shape[1]), "backend": backend, "level": level, "ms_dense_sdpa": round(dense, 3),
                                 "ms_hooked": round(ms, 3), "speedup": round(dense / ms, 3),
                                 "achieved_sparsity": round(d.achieved_sparsity, 4),
                                 "decision_ms": round(1e3 * float(np.median(decision_s)), 3),
                                 "decision_share_of_dense": round(1e3 * float(np.median(decision_s)) / dense, 4)})
                    log(json.dumps(rows[-1]))
    return rows


def bench_dense_path(checkpoint: str, model_name: str, rounds: int = 3, log=print) -> list[dict]:
    """Where a decided-dense request's time goes, interleaved `rounds` times, minima (a 135M model's
    prefill is launch-bound, so host jitter dominates medians): A dense SDPA; B the adapter
    registered, no plan; C a plan at level 0 without probes; D probes only (no decision); E the
    hook with its decision forced dense."""
    from controller.hook import attach
    from data.features import ProbeCollector
    from data.models import load_model
    from sparse_kernels import SparsePlan, disable_sparse_attention, enable_sparse_attention, use_plan
    lm = load_model(model_name, dtype="bfloat16", device="cuda")
    m, rows = lm.model, []

    def planned(**plan):
        def run():
            with use_plan(SparsePlan(dense_layers=frozenset({0, 1}), **plan)):
                return m(input_ids=ids, logits_to_keep=1)
        return run
    for length in E2E_LENGTHS:
        ids = _prompt(lm.tokenizer, length)
        res: dict[str, list[float]] = {k: [] for k in "ABCDE"}
        for _ in range(rounds):
            res["A"].append(_prefill_ms(m, ids, "min"))
            prev = enable_sparse_attention(m)
            res["B"].append(_prefill_ms(m, ids, "min"))
            res["C"].append(_timed(planned(levels=torch.zeros(1, dtype=torch.float64))))
            res["D"].append(_timed(planned(levels=None, probe_layers=frozenset({0, 1}), on_probe=ProbeCollector())))
            disable_sparse_attention(m, prev)
            with attach(lm, checkpoint, task="niah_single") as handle:
                handle.force_level = 0.0
                res["E"].append(_prefill_ms(m, ids, "min"))
        rows.append({"N": int(ids.shape[1]), **{f"ms_{k}": round(min(v), 3) for k, v in res.items()}})
        log(json.dumps(rows[-1]))
    return rows


def _timed(fn) -> float:
    import triton.testing
    with torch.no_grad():
        return float(triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="min"))


def _versions() -> dict:
    import transformers
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write (e.g. sparse_kernels/bench/h100.json)")
    p.add_argument("--checkpoint", help="controller checkpoint for the end-to-end rows (skipped without)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default=None, help="comma-separated kernel lengths (default 8K,32K,64K,128K)")
    p.add_argument("--skip-kernels", action="store_true", help="only the end-to-end rows (needs --checkpoint)")
    p.add_argument("--dense-path", action="store_true", help="also the decided-dense breakdown (needs --checkpoint)")
    p.add_argument("--probe-cost", action="store_true", help="only the probe statistics' cost per layer at 8K and 32K")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    from sparse_kernels.bench import LENGTHS, bench_kernels, kernel_table
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else LENGTHS
    result = {"device": torch.cuda.get_device_name(), "versions": _versions(),
              "command": "python -m controller.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    if args.probe_cost:
        from sparse_kernels.bench import bench_probe_cost
        result["probe_cost"] = bench_probe_cost()
        save()
        return 0
    if args.skip_kernels and not args.checkpoint:
        print("error: --skip-kernels leaves nothing to run without --checkpoint", file=sys.stderr)
        return 2
    result["kernels"] = [] if args.skip_kernels else bench_kernels(lengths=lengths)
    save()
    if args.checkpoint:
        result["end_to_end"] = bench_end_to_end(args.checkpoint, args.model)
        save()
    if args.checkpoint and args.dense_path:
        result["dense_path"] = bench_dense_path(args.checkpoint, args.model)
        save()
    print(kernel_table(result["kernels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
