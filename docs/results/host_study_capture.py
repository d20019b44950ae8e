# As run on one H200 in the eighth session of 2026-11-29, on the code of commit f237978 (scratch,
# kept as the provenance of docs/results/h200_host_studies.json). From the repository root on the GPU
# machine, the model staged: PYTHONPATH=. python docs/results/host_study_capture.py LENGTHS (comma-separated).
"""Scratch: what a request's CUDA-graph capture costs the host (new plan per call vs one plan reused)."""
import time, sys, torch, warnings, statistics
warnings.filterwarnings("ignore")
from controller.runtime.checkpoint import load_checkpoint
from controller.runtime.hook import attach
from data.models import load_model
import sparse_kernels.hf as hf
from sparse_kernels import SparsePlan, enable_sparse_attention, use_plan
lm = load_model("smollm2-135m", dtype="bfloat16", device="cuda")
ckpt = load_checkpoint("runs/demo/checkpoint")
with attach(lm, ckpt, break_even=None) as h:
    sel, dl, be = h.selection, h.dense_layers, h.backend
vocab = lm.model.config.vocab_size
steps = []
orig = hf._triton_step
def timed(*a, **k):
    t = time.perf_counter(); out = orig(*a, **k); steps.append(1e6 * (time.perf_counter() - t)); return out
hf._triton_step = timed
enable_sparse_attention(lm.model)
mk = lambda g: SparsePlan(levels=torch.full((1,), 0.9, dtype=torch.float64), selection=sel, dense_layers=dl, backend=be, cuda_graphs=g)
for n in [int(x) for x in sys.argv[1].split(",")]:
    ids = torch.randint(100, vocab - 100, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
    call = lambda: lm.model(input_ids=ids, logits_to_keep=1)
    reused = mk(True)
    for name, plan_of in {"new plan/call": lambda: mk(True), "one plan reused": lambda: reused, "no graphs": lambda: mk(False)}.items():
        with torch.no_grad():
            for _ in range(3):
                with use_plan(plan_of()): call()
            host, wall = [], []
            for _ in range(9):
                p = plan_of(); torch.cuda.synchronize(); steps.clear(); t = time.perf_counter()
                with use_plan(p): call()
                host.append(time.perf_counter() - t); torch.cuda.synchronize(); wall.append(time.perf_counter() - t)
        st = sorted(steps)
        print(f"N={n} {name}: host {1e3*statistics.median(host):.2f} ms wall {1e3*statistics.median(wall):.2f} ms; "
              f"step host us: first {steps[0]:.0f}, median {statistics.median(steps):.0f}, sum {sum(steps)/1e3:.2f} ms", flush=True)
