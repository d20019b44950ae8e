"""Mass recall (the mechanistic probe) against a brute-force float64 computation on small, awkward
shapes (partial last block, GQA, left padding, every recall level)."""
import numpy as np
import pytest
import torch

from sparse_kernels.probes import RECALL_LEVELS, mass_recall, sampled_query_blocks, sampled_query_positions
from sparse_kernels.select import SelectionSpec, num_blocks, select_blocks


def brute_force_recall(q, k, scale, spec, key_valid, level, blocks):
    b, hq, n, _ = q.shape
    g = hq // k.shape[1]
    nk = num_blocks(n, spec.block_size)
    kept = select_blocks(q, k, torch.full((b,), 1.0 - level, dtype=torch.float64), spec, scale, key_valid)
    out = np.zeros((b, len(blocks)))
    for r in range(b):
        for s, blk in enumerate(blocks):
            per_head = []
            for h in range(hq):
                mass = np.zeros(nk)
                pos, owner = sampled_query_positions(torch.tensor(blocks), spec.block_size, n)
                rows = pos[owner == s].tolist()
                assert rows and max(rows) == min((blk + 1) * spec.block_size, n) - 1 and min(rows) >= blk * spec.block_size
                for t in rows:
                    logits = (q[r, h, t].double() @ k[r, h // g, : t + 1].double().T * scale).numpy()
                    ok = np.ones(t + 1, bool) if key_valid is None else key_valid[r, : t + 1].numpy()
                    p = np.where(ok, np.exp(logits - logits[ok].max()), 0.0) if ok.any() else np.zeros(t + 1)
                    p = p / p.sum() if p.sum() > 0 else p
                    np.add.at(mass, np.arange(t + 1) // spec.block_size, p / len(rows))
                keep = kept[r, h, blk].numpy()
                per_head.append(mass[keep].sum() / max(mass.sum(), 1e-30))
            out[r, s] = np.mean(per_head)
    return out


@pytest.mark.parametrize("n,block,hq,hkv,pad", [(200, 32, 4, 2, 0), (257, 64, 3, 1, 0), (130, 16, 2, 2, 37)])
def test_mass_recall_equals_brute_force(n, block, hq, hkv, pad):
    g = torch.Generator().manual_seed(n + block)
    q, k = torch.randn(2, hq, n, 16, generator=g), torch.randn(2, hkv, n, 16, generator=g)
    key_valid = None
    if pad:
        key_valid = torch.ones(2, n, dtype=torch.bool)
        key_valid[1, :pad] = False
    spec = SelectionSpec(block_size=block)
    got = mass_recall(q, k, 0.25, spec, key_valid)
    blocks = sampled_query_blocks(num_blocks(n, block), 8, "cpu").tolist()
    assert blocks[-1] == num_blocks(n, block) - 1 and 0 not in blocks
    for level in RECALL_LEVELS:
        want = brute_force_recall(q, k, 0.25, spec, key_valid, level, blocks)
        np.testing.assert_allclose(got[f"recall{round(level * 100)}_mean"].numpy(), want.mean(1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[f"recall{round(level * 100)}_min"].numpy(), want.min(1), rtol=1e-4, atol=1e-5)
    means = np.stack([got[f"recall{round(lv * 100)}_mean"].numpy() for lv in RECALL_LEVELS], 1)
    assert (np.diff(means, axis=1) <= 1e-6).all() and (means <= 1 + 1e-6).all()   # fewer blocks, less mass
