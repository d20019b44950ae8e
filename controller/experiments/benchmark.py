"""The benchmark command: kernels (dense SDPA vs FlexAttention vs Triton on one block index) and
SmolLM2-135M prefill end to end with the controller hook, in one run on one GPU; writes JSON.

  python -m controller.benchmark --checkpoint runs/demo/checkpoint --out sparse_kernels/bench/h100.json

Owns `bench_end_to_end`: prefill at 2K..128K, rows with keys N, mode, level, ms, ms_dense (same
run), speedup, peak_mib; and the break-even table those forced rows give (`sparse_kernels.dispatch`),
which `attach` reads for this model on this card. Modes:
- `dense`: the unhooked model with SDPA;
- `forced`: a level set before the forward, no probe and no decision. `ms_with_decision` is the same
  level forced through the hook with probes and decision, timed call by call against it: their
  difference is the decision's true overhead. At level 0.9 also `ms_no_graphs` (the sparse step's
  CUDA graphs off), `ms_with_probes` (the probe statistics computed, no decision: the overhead's
  probe part) and `ms_with_probes_fused` (the same through the Triton probe). `decision_fallback`:
  None when the net decided, as it does past the stream's warm-up;
- `hook_dense`: the hook's own path for a request it runs dense; `decided`: the controller's own
  decision; these two alternate call by call with dense;
- `decided_heldout` (with --heldout STORE): the controller's own decisions on real held-out requests
  of a label store, against the best dense path, with their unsafe rate (`controller.experiments.bench_heldout`).
The JSON also records the command line. The kernel part is `sparse_kernels.bench`. Imports every
layer below it; nothing imports it.
"""
from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.errors import ArgumentParser, doc_summary

from controller.experiments.bench_calls import _forced_call, _past_warmup

E2E_LENGTHS = (2048, 8000, 16384, 32768, 65536, 131072)
REQUIRED_FORCED = (0.8, 0.9, 0.95)
NO_GRAPHS_LEVEL = 0.9   # also timed with the sparse step's CUDA graphs off (`ms_no_graphs`): their A/B, and with
# the probes computed but no decision (`ms_with_probes`): the decision's overhead split into probes and waiting
VARIANTS = {"forced": (True, False, False), "forced_no_graphs": (False, False, False),   # graphs, probes, fused probe
            "forced_probed": (True, True, False), "forced_probed_fused": (True, True, True)}


ROUNDS = 3   # every mode is measured once per round, rounds interleaved with dense (the host's speed drifts)


def _reps(n: int) -> int:
    return 5 if n <= 16384 else 3 if n <= 65536 else 2


def _measure(fn, n: int) -> tuple[float, float]:
    """(median ms over `_reps(n)` calls after one warm-up call, peak MiB allocated during them; 0
    off CUDA, where only the rows' mechanics are tested)."""
    return _measure_alternating({"": (fn, contextlib.nullcontext)}, n)[""]


def _measure_alternating(modes: dict, n: int) -> dict:
    """{key: (median ms, peak MiB)} for `modes` = {key: (call, context factory)}, whose calls
    alternate (a, b, c, a, b, c, ...) after one warm-up pass, so a drift of the host's speed hits
    every mode alike. Only the call is timed, inside its context."""
    cuda = torch.cuda.is_available()
    times, peaks = {k: [] for k in modes}, dict.fromkeys(modes, 0.0)
    with torch.no_grad():
        for rep in range(_reps(n) + 1):
            for key, (fn, context) in modes.items():
                with context():
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                if rep:   # the first pass warms every mode up
                    times[key].append(elapsed)
                    peaks[key] = max(peaks[key], torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0)
    return {k: (1e3 * float(np.median(times[k])), peaks[k]) for k in modes}


@contextlib.contextmanager
def _forcing(handle, level):
    handle.force_level = level
    try:
        yield
    finally:
        handle.force_level = None


def _variants(level: float, device: torch.device) -> tuple[str, ...]:
    """The plan variants timed at `level`: all of `VARIANTS` at `NO_GRAPHS_LEVEL` (the fused probe
    only on CUDA: the CPU interpreter is no benchmark), else the plain forced plan."""
    if level != NO_GRAPHS_LEVEL:
        return ("forced",)
    return tuple(v for v in VARIANTS if v != "forced_probed_fused" or device.type == "cuda")


def _prompt(tokenizer, length: int, vocab: int, device) -> torch.Tensor:
    """A real niah prompt up to 8K (the calibrated traffic); random token ids beyond (timing only)."""
    if length > 8000:
        gen = torch.Generator().manual_seed(length)
        return torch.randint(min(100, vocab // 4), vocab - min(100, vocab // 4), (1, length), generator=gen).to(device)
    from data.labeling import PlannedSample, realize
    from data.tasks import prompt_ids
    from data.tasks.base import TaskSpec, generated_sample_id
    spec = TaskSpec("niah_single")
    sample = realize(PlannedSample(generated_sample_id(spec.name, length, 0, 0), spec, length, 0, 0, True), tokenizer)
    return torch.tensor([prompt_ids(tokenizer, sample, True)], device=device)


class _Samples(dict):
    """(median ms, max peak MiB) per key over the rounds."""
    def add(self, key, measured: tuple[float, float]) -> None:
        self.setdefault(key, []).append(measured)

    def ms(self, key) -> float:
        return float(np.median([m for m, _ in self[key]]))

    def peak(self, key) -> float:
        return max(p for _, p in self[key])


def _row(n, mode, level, ms, peak, dense, **extra) -> dict:
    row = {"N": n, "mode": mode, "level": level, "ms": round(ms, 3), "ms_dense": round(dense, 3),
           "speedup": round(dense / ms, 3), "peak_mib": round(peak, 1), **extra}
    print(json.dumps(row), flush=True)
    return row


def _forced_round(lm, ckpt, ids, levels, samples: _Samples) -> None:
    """One round at one length: dense (the unhooked model); then per level, call by call in turn (a
    drift of the host's speed hits them alike, so their difference is the decision's overhead and
    not the drift's): the level forced with the controller paused (a plan set before the forward:
    no probe, no decision; at `NO_GRAPHS_LEVEL` also the other `VARIANTS`), and the level forced
    through the hook with probes and the decision, last, so `last_decisions` are its. The monitor is
    reset before each measurement, so no window test (once per 100 requests, on a worker thread)
    runs during the timing, and its warm-up is off (`_past_warmup`): every timed request goes
    through the controller's net, as a request after the warm-up does."""
    from controller.runtime.hook import attach
    from sparse_kernels import sliding_window_of
    n, call = int(ids.shape[1]), lambda: lm.model(input_ids=ids, logits_to_keep=1)  # noqa: E731
    samples.add("dense", _measure(call, n))
    with attach(lm, ckpt, break_even=None) as handle:
        for level in ([0.0] if sliding_window_of(lm.model) is not None else []) + list(levels):   # 0: the window path
            modes = {(v, level): (_forced_call(handle, call, level, *VARIANTS[v]), handle.paused)
                     for v in _variants(level, ids.device)}
            if level in levels:
                modes[("decision", level)] = (call, lambda level=level: _forcing(handle, level))
            _past_warmup(handle)
            for key, measured in _measure_alternating(modes, n).items():
                samples.add(key, measured)
            if level in levels:
                samples.setdefault(("achieved", level), handle.last_decisions[0].achieved_sparsity)
                samples.setdefault(("fallback", level), handle.last_decisions[0].fallback)   # None: the net decided


def _window_rows(n: int, s: _Samples) -> list[dict]:
    """Models with sliding-window layers: a plan at level 0 (those layers over their window only; no
    probe, no decision) against dense, in the same rounds."""
    if ("forced", 0.0) not in s:
        return []
    return [{"N": n, "ms": round(s.ms(("forced", 0.0)), 3), "ms_dense": round(s.ms("dense"), 3),
             "speedup": round(s.ms("dense") / s.ms(("forced", 0.0)), 3), "peak_mib": round(s.peak(("forced", 0.0)), 1)}]


def _text_statistics_ms(ids: torch.Tensor) -> float:
    """Median host time of the token-id statistics of one row (the hook runs them on a worker
    thread while the probe layers run; the decision waits for whichever finishes last)."""
    from data.features import text_statistics
    row = ids[0].cpu().numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        text_statistics(row)
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 3)


def _forced_rows(n: int, levels, s: _Samples, text_ms: float | None = None) -> list[dict]:
    dense = s.ms("dense")
    rows = [_row(n, "dense", None, dense, s.peak("dense"), dense, text_statistics_ms=text_ms)]
    for level in levels:
        ms, ms_dec = s.ms(("forced", level)), s.ms(("decision", level))
        rows.append(_row(n, "forced", level, ms, s.peak(("forced", level)), dense, ms_with_decision=round(ms_dec, 3),
                         decision_overhead_ms=round(ms_dec - ms, 3), decision_overhead_share=round((ms_dec - ms) / dense, 4),
                         achieved_sparsity=round(s[("achieved", level)], 4), decision_fallback=s[("fallback", level)],
                         **({"ms_no_graphs": round(s.ms(("forced_no_graphs", level)), 3),
                             "ms_with_probes": round(s.ms(("forced_probed", level)), 3)}
                            if ("forced_no_graphs", level) in s else {}),
                         **({"ms_with_probes_fused": round(s.ms(("forced_probed_fused", level)), 3)}
                            if ("forced_probed_fused", level) in s else {})))
    return rows


def _hooked_rows(lm, handle, ids) -> list[dict]:
    """hook_dense: the hook's own path for a request it runs dense (skipped before the probes where
    its dispatch skips, else probes + decision + dense); decided: the controller's own decision.
    Dense (the hook detached: `handle.detached()`), the window path (sliding-window models: a plan at
    level 0, no probe, no decision), probed and own calls alternate within each round, so
    `ms_best_dense` (the faster of dense and the window path) is measured beside the hook's rows."""
    from sparse_kernels import sliding_window_of
    n, call, s = int(ids.shape[1]), lambda: lm.model(input_ids=ids, logits_to_keep=1), _Samples()  # noqa: E731
    modes = {"dense": (call, handle.detached)}
    if sliding_window_of(lm.model) is not None:
        modes["window"] = (_forced_call(handle, call, 0.0, *VARIANTS["forced"]), handle.paused)
    modes |= {"probed": (call, lambda: _forcing(handle, 0.0)),
              "own": (call, contextlib.nullcontext)}   # own last: `last_decisions` are its
    for _ in range(ROUNDS):
        _past_warmup(handle)
        for key, measured in _measure_alternating(modes, n).items():
            s.add(key, measured)
    d, dense = handle.last_decisions[0], s.ms("dense")
    best = min(dense, s.ms("window")) if "window" in s else dense
    skipped = handle.decider.skip_reason(n, [n]) is not None
    own = skipped and d.level == 0   # the hook's own path for this request is the dense one
    key = "own" if own else "probed"
    path = "probed" if not own else "window" if handle.break_even and handle.break_even.runs_window(n) else "skipped"
    vs_best = {"ms_best_dense": round(best, 3), **({"ms_window": round(s.ms("window"), 3)} if "window" in s else {})}
    return [_row(n, "hook_dense", None, s.ms(key), s.peak(key), dense, path=path, ms_probed=round(s.ms("probed"), 3),
                 **vs_best, speedup_best_dense=round(best / s.ms(key), 3)),
            _row(n, "decided", d.level, s.ms("own"), s.peak("own"), dense, fallback=d.fallback, ood=d.ood,
                 achieved_sparsity=round(d.achieved_sparsity, 4), **vs_best,
                 speedup_best_dense=round(best / s.ms("own"), 3))]


def _warm_hooked(lm, handle, prompts) -> None:
    """One untimed call of every hooked mode at every length before any is timed: the first length
    timed must not pay the freshly attached hook's first calls (allocator, lazy set-up, clocks)."""
    with torch.no_grad():
        for ids in prompts:
            for context in (handle.detached, lambda: _forcing(handle, 0.0), contextlib.nullcontext):
                _past_warmup(handle)
                with context():
                    lm.model(input_ids=ids, logits_to_keep=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_end_to_end(checkpoint: str, model_name: str, lengths=E2E_LENGTHS, device: str = "cuda",
                     dtype: str = "bfloat16", progress=None, heldout: tuple | None = None) -> tuple[list[dict], dict]:
    """End-to-end prefill rows (keys N, mode, level, ms, ms_dense, speedup, peak_mib) and the
    break-even table this run measured (from the forced rows, decision included). `progress(rows)`,
    if given, receives the rows so far after each length (the command saves them: a run cut short
    keeps what it measured). `heldout` = (label store, target lengths, requests per length) adds the
    `decided_heldout` rows (`controller.experiments.bench_heldout`)."""
    from controller.runtime.checkpoint import load_checkpoint
    from controller.runtime.hook import attach
    from data.models import load_model, model_fingerprint
    from sparse_kernels.dispatch import WIN_MARGIN, BreakEven
    lm = load_model(model_name, dtype=dtype, device=device)
    vocab = lm.model.config.vocab_size
    prompts = {n: _prompt(lm.tokenizer, n, vocab, device) for n in lengths}
    ckpt = load_checkpoint(checkpoint)
    if heldout is not None:   # before any timing: a bad store fails fast
        from controller.experiments.bench_heldout import heldout_requests
        held = heldout_requests(heldout[0], ckpt, checkpoint, heldout[1], heldout[2], lm.tokenizer)
    levels = sorted({float(x) for x in ckpt.levels if x > 0} | set(REQUIRED_FORCED))
    rows, window = [], []
    for ids in prompts.values():
        samples = _Samples()
        for _ in range(ROUNDS):
            _forced_round(lm, ckpt, ids, levels, samples)
        rows += _forced_rows(int(ids.shape[1]), levels, samples, _text_statistics_ms(ids))
        window += _window_rows(int(ids.shape[1]), samples)
        if progress is not None:
            progress(rows)
    card = torch.cuda.get_device_name() if device == "cuda" else device
    table = BreakEven.from_rows([r for r in rows if r["mode"] == "forced"], f"measured on {card}", window_rows=window)
    with attach(lm, ckpt, break_even=table) as handle:
        _warm_hooked(lm, handle, prompts.values())
        for ids in prompts.values():
            rows += _hooked_rows(lm, handle, ids)
        if heldout is not None:
            from controller.experiments.bench_heldout import decided_heldout_rows
            rows += decided_heldout_rows(lm, handle, ckpt, *held, rows, _measure_alternating)
    fp = model_fingerprint(lm.model)[0]
    record = {"model": model_name, "model_id": fp["id"], "weights_id": fp["weights_id"], **table.to_json(), "window": window,
              "rule": "a level is worth running from the shortest length from which, decision included, it "
                      f"took at most {WIN_MARGIN}x dense (median of interleaved rounds) at that length and every longer "
                      "measured length; window_from (models with sliding-window layers): the same rule for a "
                      "plan at level 0 with no probe and no decision (those layers over their window only)"}
    return rows, record


def e2e_table(rows: list[dict]) -> str:
    lines = ["| N | mode | level | ms | ms dense | speedup | decision overhead ms | peak MiB |", "|" + "---|" * 8]
    for r in rows:
        level = "-" if r["level"] is None else r["level"]
        lines.append(f"| {r['N']} | {r['mode']} | {level} | {r['ms']} | {r['ms_dense']} | {r['speedup']} | "
                     f"{r.get('decision_overhead_ms', '-')} | {r['peak_mib']} |")
    return "\n".join(lines)


def _versions() -> dict:
    import transformers
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _parse_shapes(text: str) -> tuple[tuple[int, int, int, int], ...] | None:
    """Kernel shapes from `Hq:Hkv:D:block,...`; None when malformed."""
    try:
        shapes = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        return None
    if not shapes or any(len(s) != 4 or min(s) < 1 or s[0] % s[1] for s in shapes):
        return None
    return shapes


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m controller.benchmark", description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="JSON file to write (e.g. sparse_kernels/bench/h100.json)")
    p.add_argument("--checkpoint", help="controller checkpoint for the end-to-end rows (skipped without)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default=None, help="comma-separated kernel lengths (default 8K,32K,64K,128K)")
    p.add_argument("--shapes", default=None,
                   help="kernel shapes Hq:Hkv:D:block, comma-separated (default 32:8:128:128,9:3:64:64; "
                        "Gemma 3 270M is 4:1:256:64)")
    p.add_argument("--skip-kernels", action="store_true", help="only the end-to-end rows (needs --checkpoint)")
    p.add_argument("--e2e-lengths", default=None, help="comma-separated end-to-end lengths (default 2K..128K)")
    p.add_argument("--probe-cost", action="store_true", help="only the probe statistics' cost per layer at 8K and 32K")
    p.add_argument("--heldout", help="a label store: also time the controller's own decisions on its held-out requests")
    p.add_argument("--heldout-lengths", default="16000,32000,48000,64000", help="target lengths of --heldout requests")
    p.add_argument("--heldout-per-length", type=int, default=8, help="--heldout requests per length")
    args = p.parse_args(argv)
    shapes = _parse_shapes(args.shapes) if args.shapes else None
    if args.shapes and shapes is None:
        print(f"error: --shapes {args.shapes!r}: give Hq:Hkv:D:block[,...] with Hq a multiple of Hkv, e.g. 4:1:256:64",
              file=sys.stderr)
        return 2
    from sparse_kernels.backends import switch_problem
    problem = switch_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    from sparse_kernels.bench import LENGTHS, SHAPES, bench_kernels, kernel_table
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else LENGTHS
    e2e_lengths = tuple(int(x) for x in args.e2e_lengths.split(",")) if args.e2e_lengths else E2E_LENGTHS
    shapes = shapes or SHAPES
    result = {"device": torch.cuda.get_device_name(), "versions": _versions(),
              "command": "python -m controller.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        from data.store import write_text_atomic
        write_text_atomic(out, json.dumps(result, indent=1))

    if args.probe_cost:
        from sparse_kernels.bench import bench_probe_cost
        result["probe_cost"] = bench_probe_cost()
        save()
        return 0
    if args.skip_kernels and not args.checkpoint:
        print("error: --skip-kernels leaves nothing to run without --checkpoint", file=sys.stderr)
        return 2
    result["kernels"] = [] if args.skip_kernels else bench_kernels(shapes=shapes, lengths=lengths)
    save()
    if args.checkpoint:
        def partial(rows):   # saved after each length, without a break-even table until the end
            result["end_to_end"] = rows
            save()
        heldout = None if not args.heldout else (
            args.heldout, tuple(int(x) for x in args.heldout_lengths.split(",")), args.heldout_per_length)
        result["end_to_end"], result["break_even"] = bench_end_to_end(args.checkpoint, args.model, e2e_lengths,
                                                                      progress=partial, heldout=heldout)
        save()
        print(e2e_table(result["end_to_end"]))
    print(kernel_table(result["kernels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
