# As run on one H200 in the eighth session of 2026-11-29, on the code of commit 0560c91 (scratch,
# kept as the provenance of docs/results/h200_host_studies.json). No model needed: from the repository
# root on the GPU machine, PYTHONPATH=. python docs/results/host_study_probe.py
"""Scratch: the probe's cost per call on the GPU, Triton path vs torch path: host, wall, GPU busy, kernel count, top kernels."""
import os, time, torch, warnings
warnings.filterwarnings("ignore")
from torch.profiler import profile, ProfilerActivity
from sparse_kernels.probes import attention_probe
from sparse_kernels.select import SelectionSpec
spec = SelectionSpec(block_size=64)
for n in (16384, 32768, 131072):
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 9, n, 64, device="cuda", dtype=torch.bfloat16, generator=g); k = torch.randn(1, 3, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    for path in ("1", "0"):
        os.environ["SPARSE_FUSED_PROBE"] = path
        f = lambda: attention_probe(q, k, 0.125, 64, 64, None, spec)
        for _ in range(3): f()
        torch.cuda.synchronize()
        t = time.perf_counter(); [f() for _ in range(20)]; host = (time.perf_counter() - t) / 20 * 1e3
        torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f(); torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in ev) / 1e3
        print(f"N={n} {'triton' if path == '1' else 'torch'}: host {host:.3f} ms/call, wall {wall:.3f} ms/call (20 back to back), GPU busy {busy:.3f} ms in {len(ev)} kernels", flush=True)
        rows = sorted(((e.device_time, e.name) for e in ev), reverse=True)[:8]
        print("   top:", [(round(t / 1e3, 3), nm[:50]) for t, nm in rows], flush=True)
