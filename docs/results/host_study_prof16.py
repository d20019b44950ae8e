# As run on one H200 in the eighth session of 2026-11-29, on the code of commit f237978 (scratch,
# kept as the provenance of docs/results/h200_host_studies.json). From the repository root on the GPU
# machine, the model staged: PYTHONPATH=. python docs/results/host_study_prof16.py LENGTHS (comma-separated).
"""Scratch: where forced 0.9 / dense time goes at 8K-32K (host launch time, GPU busy time, top kernels)."""
import time, sys, torch, warnings, statistics
warnings.filterwarnings("ignore")
from torch.profiler import profile, ProfilerActivity
from controller.runtime.checkpoint import load_checkpoint
from controller.runtime.hook import attach
from data.models import load_model
from sparse_kernels import SparsePlan, disable_sparse_attention, enable_sparse_attention, use_plan
lm = load_model("smollm2-135m", dtype="bfloat16", device="cuda")
ckpt = load_checkpoint("runs/demo/checkpoint")
with attach(lm, ckpt, break_even=None) as h:
    sel, dl, be = h.selection, h.dense_layers, h.backend
vocab = lm.model.config.vocab_size
for n in [int(x) for x in sys.argv[1].split(",")]:
    ids = torch.randint(100, vocab - 100, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
    call = lambda: lm.model(input_ids=ids, logits_to_keep=1)
    modes = {"dense": None, "forced0.9": lambda: use_plan(SparsePlan(levels=torch.full((1,), 0.9, dtype=torch.float64), selection=sel, dense_layers=dl, backend=be))}
    for name, ctx in modes.items():
        if ctx is None:
            disable_sparse_attention(lm.model, "sdpa"); run = call
        else:
            enable_sparse_attention(lm.model)
            def run():
                with ctx():
                    return call()
        with torch.no_grad():
            for _ in range(3): run()
            torch.cuda.synchronize()
            host, wall = [], []
            for _ in range(7):
                torch.cuda.synchronize(); t = time.perf_counter(); run(); host.append(time.perf_counter() - t)
                torch.cuda.synchronize(); wall.append(time.perf_counter() - t)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                run(); torch.cuda.synchronize()
        evs = prof.key_averages()
        busy = sum(e.self_device_time_total for e in evs if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
        print(f"N={n} {name}: host-return {1e3*statistics.median(host):.2f} ms, wall {1e3*statistics.median(wall):.2f} ms, GPU busy (profiled) {busy:.2f} ms", flush=True)
        print(evs.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50), flush=True)
    disable_sparse_attention(lm.model, "sdpa")
