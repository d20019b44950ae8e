"""Where the hook's decision overhead goes (one H200; scratch study, not part of the package).

  python docs/results/decision_overhead_study.py 8000,32768,131072   # OUT=dir for decision_overhead.json

SmolLM2-135M with the `make demo` checkpoint, random token ids, level 0.9 throughout. Modes, timed
alternately (3 rounds; medians): `dense` (hook detached), `plan` (a plan with the level set before
the forward: no probe, no decision), `plan_probes` (the same, computing the probe statistics), `hook`
(the hook, its level forced: probes, token statistics, guard, monitor and decision all run) and the
hook with one part removed: `nolimit` (no one-thread limit around the decision math), `textpre` (the
token statistics precomputed), `noguard` (no guard and no monitor: the net always runs), `all3`.
The timeline of each hook mode (last round, medians): when the host reached the first sparse layer
after the forward started (`enter`), then how long it waited for the probe statistics' copy, for the
token statistics, and how long the decision took.
"""
import contextlib, time, json, sys, os, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
import controller.runtime.hook as H
import controller.runtime.probes as P
from controller.experiments.benchmark import _measure_alternating, _forcing
from controller.runtime.checkpoint import load_checkpoint
from data.models import load_model
from sparse_kernels import SparsePlan, use_plan, enable_sparse_attention, disable_sparse_attention

lm = load_model("smollm2-135m", dtype="bfloat16", device=os.environ.get("DEV","cuda"))
ckpt = load_checkpoint("runs/demo/checkpoint")
LEN = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [8000, 32768]
TIMES = {}
orig_rows = H.ControllerHandle._decide_rows
orig_host = H.ProbeCollector.host if hasattr(H, "ProbeCollector") else None
def timed_rows(self, active):
    t0 = time.perf_counter()
    c = active.collector; c.host(); t1 = time.perf_counter()
    [f.result() for f in active.text]; t2 = time.perf_counter()
    orig_rows(self, active); t3 = time.perf_counter()
    d = TIMES.setdefault(MODE[0], {})
    d.setdefault("enter", []).append(t0 - T0[0]); d.setdefault("wait_probe", []).append(t1 - t0)
    d.setdefault("wait_text", []).append(t2 - t1); d.setdefault("decide", []).append(t3 - t2)
H.ControllerHandle._decide_rows = timed_rows
T0 = [0.0]
MODE = ['']
out = []
for n in LEN:
    ids = torch.randint(100, 49000, (1, n), generator=torch.Generator().manual_seed(n)).to(os.environ.get("DEV","cuda"))
    def call():
        T0[0] = time.perf_counter(); return lm.model(input_ids=ids, logits_to_keep=1)
    with H.attach(lm, ckpt, break_even=None) as h:
        sel = (h.selection, h.dense_layers, h.backend, h.probe_layers, h.probe_window)
        real_text = P.text_statistics
        pre = real_text(ids[0].cpu().numpy())
        def plan_call(probes):
            def f():
                with use_plan(SparsePlan(levels=torch.full((1,), 0.9, dtype=torch.float64), selection=sel[0], dense_layers=sel[1],
                                         backend=sel[2], probe_layers=sel[3] if probes else frozenset(), probe_window=sel[4],
                                         on_probe=(lambda l, s: None) if probes else None)):
                    return call()
            return f
        @contextlib.contextmanager
        def ctx(no_limit=False, text_pre=False, no_guard=False):
            MODE[0] = f"{int(no_limit)}{int(text_pre)}{int(no_guard)}"
            h.force_level = 0.9
            saved = (h.decider.one_thread, h.guard, h.monitor)
            if no_limit: h.decider.one_thread = contextlib.nullcontext
            if text_pre: P.text_statistics = lambda x: pre
            if no_guard: h.guard, h.monitor = None, None
            if h.monitor is not None: h.monitor.reset()
            try: yield
            finally:
                h.decider.one_thread, h.guard, h.monitor = saved; P.text_statistics = real_text; h.force_level = None
        def paused():
            return h.detached()
        modes = {
            "dense": (call, h.detached),
            "plan": (lambda: (h._local.__setattr__("paused", True), plan_call(False)(), h._local.__setattr__("paused", False)), contextlib.nullcontext),
            "plan_probes": (lambda: (h._local.__setattr__("paused", True), plan_call(True)(), h._local.__setattr__("paused", False)), contextlib.nullcontext),
            "hook": (call, ctx),
            "hook_nolimit": (call, lambda: ctx(no_limit=True)),
            "hook_textpre": (call, lambda: ctx(text_pre=True)),
            "hook_noguard": (call, lambda: ctx(no_guard=True)),
            "hook_all3": (call, lambda: ctx(True, True, True)),
        }
        res = {k: [] for k in modes}
        for rnd in range(3):
            TIMES.clear()
            for k, v in _measure_alternating(modes, n).items():
                res[k].append(v[0])
        med = {k: float(np.median(v)) for k, v in res.items()}
        tm = {m: {k: round(1e3 * float(np.median(v)), 3) for k, v in d.items()} for m, d in TIMES.items()}
        print(n, json.dumps({k: round(v, 2) for k, v in med.items()}), "last round, per hook mode (limit-off, text-pre, guard-off):", tm, flush=True)
        out.append({"N": n, "ms": med, "timeline_ms": tm})
json.dump(out, open(os.environ.get("OUT", ".") + "/decision_overhead.json", "w"), indent=1)
