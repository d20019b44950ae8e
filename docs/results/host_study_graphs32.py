# As run on one H200 in the eighth session of 2026-11-29, on the code of commit f237978 (scratch,
# kept as the provenance of docs/results/h200_host_studies.json). From the repository root on the GPU
# machine, the model staged: PYTHONPATH=. python docs/results/host_study_graphs32.py LENGTHS (comma-separated).
"""Scratch A/B: the sparse step's CUDA graphs at 32K-64K (today off from 32K), forced and through the hook."""
import contextlib, sys, time, torch, warnings, statistics, json
warnings.filterwarnings("ignore")
from controller.runtime.checkpoint import load_checkpoint
from controller.runtime.hook import attach
from controller.experiments import benchmark as B
from data.models import load_model
import sparse_kernels.graphs as G
from sparse_kernels import SparsePlan, use_plan
lm = load_model("smollm2-135m", dtype="bfloat16", device="cuda")
ckpt = load_checkpoint("runs/demo/checkpoint")
@contextlib.contextmanager
def graphs_below(t):
    old = G.GRAPH_BELOW_TOKENS; G.GRAPH_BELOW_TOKENS = t
    try: yield
    finally: G.GRAPH_BELOW_TOKENS = old
out = {}
with attach(lm, ckpt, break_even=None) as h, torch.no_grad():
    sel, dl, be = h.selection, h.dense_layers, h.backend
    for n in [int(x) for x in sys.argv[1].split(",")]:
        ids = B._prompt(lm.tokenizer, n, lm.model.config.vocab_size, "cuda")
        call = lambda: lm.model(input_ids=ids, logits_to_keep=1)
        def forced():
            with h.detached(), use_plan(SparsePlan(levels=torch.full((1,), 0.9, dtype=torch.float64), selection=sel, dense_layers=dl, backend=be)):
                from sparse_kernels import enable_sparse_attention
                enable_sparse_attention(lm.model)
                return call()
        def decided():
            h.force_level = 0.9
            try: return call()
            finally: h.force_level = None
        def dense():
            with h.detached(): return call()
        modes = {"dense": (dense, contextlib.nullcontext),
                 "forced_graphs": (forced, lambda: graphs_below(10**9)), "forced_eager": (forced, lambda: graphs_below(1)),
                 "decision_graphs": (decided, lambda: graphs_below(10**9)), "decision_eager": (decided, lambda: graphs_below(1))}
        s = {k: [] for k in modes}
        for _ in range(3):
            B._past_warmup(h)
            for k, (ms, _) in B._measure_alternating(modes, n).items(): s[k].append(ms)
        res = {k: round(statistics.median(v), 2) for k, v in s.items()}
        res["decision_fallback"] = h.last_decisions[0].fallback
        out[n] = res
        print(n, json.dumps(res), flush=True)
print(json.dumps(out))
