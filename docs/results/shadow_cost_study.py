"""The cost of one shadow label of the live certificate (`certify_live`): a dense decode of 32 new
tokens, one sparse prefill at level 0.9 and one teacher-forced pass, against one dense prefill of the
same request. SmolLM2-135M, the `make demo` checkpoint, random token ids; medians of 3 after a warm-up.

  python docs/results/shadow_cost_study.py                       # GPU: 8K and 32K tokens, bf16
  DEV=cpu LENS=1024,2048 OUT=docs/results python docs/results/shadow_cost_study.py   # CPU, fp32

Writes OUT/shadow_cost.json (device, versions, rows) and prints one row per length.
"""
import json, os, platform, statistics, sys, time
import torch, transformers
try:
    import triton
    TRITON = triton.__version__
except ImportError:
    TRITON = None
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))   # the repo, uninstalled too
from controller.runtime import attach
from controller.runtime.shadow import shadow_measurements
from data.models import load_model

DEV = os.environ.get("DEV", "cuda")
lm = load_model("smollm2-135m", dtype="bfloat16" if DEV == "cuda" else "float32", device=DEV)
rows = []
with attach(lm, "runs/demo/checkpoint", break_even=None) as h:
    for n in [int(x) for x in os.environ.get("LENS", "8000,32768").split(",")]:
        ids = torch.randint(100, 49000, (1, n), generator=torch.Generator().manual_seed(n)).to(DEV)
        def dense():
            with h.detached(), torch.no_grad():
                lm.model(input_ids=ids, logits_to_keep=1)
        def shadow():
            shadow_measurements(h, ids[0].tolist(), 0.9, 32)
        t = {}
        for name, fn in (("dense_prefill", dense), ("shadow_label", shadow)):
            fn(); (torch.cuda.synchronize() if DEV == "cuda" else None); xs = []
            for _ in range(3):
                s = time.perf_counter(); fn(); (torch.cuda.synchronize() if DEV == "cuda" else None); xs.append(time.perf_counter() - s)
            t[name] = 1e3 * statistics.median(xs)
        rows.append({"N": n, "dense_prefill_ms": round(t["dense_prefill"], 2), "shadow_label_ms": round(t["shadow_label"], 2),
                     "dense_prefills_per_label": round(t["shadow_label"] / t["dense_prefill"], 2)})
        print(rows[-1], flush=True)
out = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "versions": {"torch": torch.__version__, "triton": TRITON,
       "transformers": transformers.__version__, "python": platform.python_version()},
       "what": f"one shadow label at level 0.9, max_new 32, SmolLM2-135M {lm.model.dtype}, demo checkpoint; medians of 3 after one warm-up",
       "cpu_count": os.cpu_count(),
       "rows": rows}
name = "shadow_cost.json" if DEV == "cuda" else f"shadow_cost_{DEV}.json"
with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
    json.dump(out, f, indent=1)
