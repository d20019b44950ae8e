"""One-off study (2026-11-29), run through probe_layers_study.py: does the attention OUTPUT error of
the selection at each level, at the probe's sampled queries of layers 0-1, predict safety better
than the shipped mass recall? Not part of the product (see docs/results/probe_layers.md)."""
import json
import time
import warnings

import numpy as np
import torch


class _Stop(Exception):
    pass


def output_errors(q, k, v, scale, spec) -> list[tuple[float, float]]:
    """Per level of RECALL_LEVELS: (mean over heads and sampled queries of ||o_L - o|| / ||o||, max
    over the sampled query blocks of the head and query mean); o_L attends only the blocks that the
    selection keeps at level L (the probe's ranking and counts), renormalised. Unpadded rows only."""
    from sparse_kernels.probes import (QUERIES_PER_BLOCK, RECALL_LEVELS, SAMPLED_BLOCKS, _ranked_blocks, _sample_plan,
                                       _unpadded_masks_and_counts)
    from sparse_kernels.select import group_scores
    b, hq, n, d = q.shape
    blocks, pos, owner, per = _sample_plan(n, spec.block_size, SAMPLED_BLOCKS, QUERIES_PER_BLOCK, q.device)
    forced, not_causal, counts = _unpadded_masks_and_counts(n, spec, SAMPLED_BLOCKS, tuple(RECALL_LEVELS), q.device)
    allowed = (torch.arange(n)[None, :] <= pos[:, None])[None, None]
    probs = torch.softmax((group_scores(q[:, :, pos], k) * scale).masked_fill(~allowed, float("-inf")), -1)
    vv = v.repeat_interleave(hq // k.shape[1], 1)
    full = probs @ vv                                                                  # [1, H, R, D]
    nk, bs = -(-n // spec.block_size), spec.block_size
    pp = torch.nn.functional.pad(probs, (0, nk * bs - n)).view(b, hq, len(pos), nk, bs)
    per_block = torch.einsum("bhrkj,bhkjd->bhrkd", pp, torch.nn.functional.pad(vv, (0, 0, 0, nk * bs - n)).view(b, hq, nk, bs, d))
    order = _ranked_blocks(q, k, blocks, forced, not_causal, spec, scale, None)[:, :, owner]   # [1, H, R, nk]
    out_cum = per_block.gather(3, order[..., None].expand(-1, -1, -1, -1, d)).cumsum(3)
    mass_cum = pp.sum(-1).gather(3, order).cumsum(3)
    result = []
    for li in range(len(RECALL_LEVELS)):
        at = (counts[li, 0][owner] - 1).clamp_min(0)[None, None, :, None].expand(b, hq, -1, 1)
        o_l = out_cum.gather(3, at[..., None].expand(-1, -1, -1, -1, d))[:, :, :, 0] / mass_cum.gather(3, at).clamp_min(1e-30)
        per_query = ((o_l - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)).mean(1)[0]   # [R]
        by_block = torch.zeros(len(blocks)).index_add_(0, owner, per_query) / per
        result.append((float(per_query.mean()), float(by_block.max())))
    return result


def collect_output_error(root: str, out: str) -> None:
    import sparse_kernels.hf as hf
    from data.backfill import _samples_of
    from data.config import SparseConfig, from_dict
    from data.labeling import realize
    from data.models import load_model
    from data.store import LabelStore
    from data.tasks import prompt_ids
    from sparse_kernels import enable_sparse_attention
    from sparse_kernels.probes import RECALL_LEVELS
    from transformers import AttentionInterface
    store = LabelStore(root)
    meta, table = store.meta(), store.table()
    sids = list(table[table["level"] == 0.0]["sample_id"])
    lm = load_model(meta["model_name"], "float32", "cpu")
    enable_sparse_attention(lm.model)
    captured, adapter = {}, hf.sparse_attention_forward

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        captured[module.layer_idx] = (query.float(), key.float(), value.float(), scaling or query.shape[-1] ** -0.5)
        if module.layer_idx == 1:
            raise _Stop
        return adapter(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    AttentionInterface.register(hf.ATTENTION_NAME, capture)   # replaces the adapter in this process only
    spec = from_dict(SparseConfig, meta["identity"]["sparse"]).selection()
    planned, rows, start = _samples_of(meta, set(sids), lm.tokenizer), {}, time.time()
    for i, sid in enumerate(sids):
        sample = realize(planned[sid], lm.tokenizer)
        ids = prompt_ids(lm.tokenizer, sample, meta["identity"]["data"]["chat_template"])
        with torch.no_grad():
            try:
                lm.model(input_ids=torch.tensor([ids]), use_cache=False)
            except _Stop:
                pass
            rows[sid] = [output_errors(*captured[layer], spec) for layer in (0, 1)]
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{len(sids)} {time.time() - start:.0f}s", flush=True)
    json.dump({"levels": list(RECALL_LEVELS), "store": root, "rows": rows}, open(out, "w"))


def analyse_output_error(path: str, criterion: str = "fidelity") -> dict:
    from sklearn.metrics import roc_auc_score
    from controller.learning.config import ControllerJobConfig
    from controller.learning.dataset import arrays_from_store
    from controller.experiments.holdout import FAMILIES
    from data.config import load_config
    from data.features import FEATURE_NAMES
    from probe_layers_study import LEVELS, _held_out_auc
    warnings.filterwarnings("ignore")
    d = json.load(open(path))
    job = load_config(ControllerJobConfig, "configs/demo_smollm2.yaml", [f"criterion.name={criterion}", "logging.wandb=disabled"])
    a, _ = arrays_from_store(job.labels, job.criterion)
    pos = {s: i for i, s in enumerate(a.sample_ids)}
    sids = [s for s in d["rows"] if s in pos]
    idx = np.array([pos[s] for s in sids])
    errors = np.array([d["rows"][s] for s in sids]).mean(1)       # [n, levels, (mean, max)], mean of layers 0-1
    lab = a.label_index[idx]
    fam = np.array([next(f for f, ts in FAMILIES.items() if t in ts) for t in a.tasks[idx]])
    shipped = a.features[idx][:, [i for i, n in enumerate(FEATURE_NAMES) if not n.startswith("task_")]]
    flat, loglen = errors.reshape(len(sids), -1), a.features[idx, FEATURE_NAMES.index("log_length")]
    at = {li: d["levels"].index(int(lv) / 100) for li, lv in LEVELS.items()}
    held = {name: _held_out_auc(x, lab, fam, FAMILIES) for name, x in
            {"shipped": shipped, "output error + log length": np.column_stack([flat, loglen]),
             "shipped + output error": np.column_stack([shipped, flat])}.items()}
    columns = {"mass recall (shipped)": lambda li: a.features[idx, FEATURE_NAMES.index(f"probe_recall{LEVELS[li]}_mean")],
               "output error, mean": lambda li: -errors[:, at[li], 0], "output error, max": lambda li: -errors[:, at[li], 1]}
    within = {name: {f: float(np.mean([roc_auc_score(lab[fam == f] >= li, col(li)[fam == f]) for li in LEVELS
                                       if 0 < (lab[fam == f] >= li).mean() < 1])) for f in FAMILIES}
              for name, col in columns.items()}
    result = {"requests": len(sids), "criterion": criterion, "held_out": held, "within": within}
    for kind in ("held_out", "within"):
        for name, r in result[kind].items():
            print(f"| {kind} | {name} | " + " | ".join(f"{v:.2f}" for v in r.values()) + f" | {np.mean(list(r.values())):.2f} |")
    return result
