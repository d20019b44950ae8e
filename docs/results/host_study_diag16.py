# As run on one H200 in the eighth session of 2026-11-29, on the code of commit f237978 (scratch,
# kept as the provenance of docs/results/h200_host_studies.json). From the repository root on the GPU
# machine, the model staged: PYTHONPATH=. python docs/results/host_study_diag16.py LENGTHS (comma-separated).
"""Scratch: why the benchmark's forced rows at 16K are slower than the same plan timed alone.
Times forced 0.9 (new plan per call) before and after the benchmark's own round, and which threads burn CPU."""
import os, time, sys, torch, warnings, statistics, threading
warnings.filterwarnings("ignore")
from controller.runtime.checkpoint import load_checkpoint
from controller.runtime.hook import attach
from controller.experiments import benchmark as B
from data.models import load_model
from sparse_kernels import SparsePlan, enable_sparse_attention, disable_sparse_attention, use_plan
lm = load_model("smollm2-135m", dtype="bfloat16", device="cuda")
ckpt = load_checkpoint("runs/demo/checkpoint")
with attach(lm, ckpt, break_even=None) as h:
    sel, dl, be = h.selection, h.dense_layers, h.backend
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
ids = B._prompt(lm.tokenizer, n, lm.model.config.vocab_size, "cuda")
call = lambda: lm.model(input_ids=ids, logits_to_keep=1)
def cpu_by_thread():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            out[tid] = (name, int(f[11]) + int(f[12]))
        except OSError:
            pass
    return out
def forced_ms(tag):
    prev = enable_sparse_attention(lm.model)
    def f():
        with use_plan(SparsePlan(levels=torch.full((1,), 0.9, dtype=torch.float64), selection=sel, dense_layers=dl, backend=be)):
            return call()
    before = cpu_by_thread(); t0 = time.perf_counter()
    ms, _ = B._measure(f, n)
    el = time.perf_counter() - t0; after = cpu_by_thread()
    disable_sparse_attention(lm.model, prev)
    busy = sorted(((after[t][1] - before.get(t, ("", 0))[1], after[t][0]) for t in after), reverse=True)[:6]
    print(f"{tag}: forced 0.9 {ms:.2f} ms; threads {len(after)}; CPU ticks (1/100 s) in {el:.2f} s: {busy}", flush=True)
print("torch threads", torch.get_num_threads(), "OMP", os.environ.get("OMP_NUM_THREADS"), "cpus", os.cpu_count())
with torch.no_grad():
    B._measure(call, n)
    print(f"dense {B._measure(call, n)[0]:.2f} ms", flush=True)
    forced_ms("before the round")
    forced_ms("before the round, again")
    s = B._Samples()
    t0 = time.perf_counter(); B._forced_round(lm, ckpt, ids, [0.9], s); print(f"round took {time.perf_counter()-t0:.1f} s")
    print({str(k): (round(v[0][0], 2) if isinstance(v, list) else v) for k, v in s.items()}, flush=True)
    forced_ms("after the round")
    time.sleep(3)
    forced_ms("after the round + 3 s sleep")
    from threadpoolctl import ThreadpoolController
    with ThreadpoolController().limit(limits=1):
        forced_ms("after, pools limited to 1")
    print(f"dense {B._measure(call, n)[0]:.2f} ms", flush=True)
