"""Block selection: the knob, sink/local/causal guarantees, top-k choice, accounting."""
import pytest
import torch

from sparse_kernels.select import (METHODS, SelectionSpec, achieved_sparsity, block_accounting,
                                   block_topk_scores, causal_block_mask, forced_block_mask, kept_block_counts,
                                   select_blocks)


def rand_qk(gen, b=2, hq=6, hkv=2, n=300, d=16):
    return (torch.randn(b, hq, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen))


def test_counts_monotone_in_density_and_full_at_one():
    nb = 17
    forced = torch.full((1, nb), 2)
    prev = None
    for d in torch.linspace(0, 1, 41):
        c = kept_block_counts(d.view(1), nb, forced)[0]
        assert (c >= torch.clamp(forced[0], max=torch.arange(1, nb + 1))).all()
        assert (c <= torch.arange(1, nb + 1)).all()
        if prev is not None:
            assert (c >= prev).all()
        prev = c
    assert torch.equal(prev, torch.arange(1, nb + 1))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n,bs", [(300, 32), (64, 16), (1000, 64), (33, 32)])
def test_selection_keeps_sink_local_and_is_causal(gen, method, n, bs):
    q, k = rand_qk(gen, n=n)
    spec = SelectionSpec(method=method, block_size=bs, sink_blocks=1, local_blocks=2)
    density = torch.tensor([0.0, 0.37])
    m = select_blocks(q, k, density, spec, 0.25)
    nb = -(-n // bs)
    assert m.shape == (2, 6, nb, nb) and m.dtype == torch.bool
    assert not (m & ~causal_block_mask(nb, m.device)).any(), "a block above the diagonal was kept"
    forced = forced_block_mask(nb, spec, torch.zeros(2, dtype=torch.long))
    assert (m | ~forced[:, None]).all(), "a sink or local block was dropped"
    expected = kept_block_counts(density, nb, forced.sum(-1))
    assert torch.equal(m.sum(-1), expected[:, None, :].expand(2, 6, nb))


def test_density_one_keeps_every_causal_block(gen):
    q, k = rand_qk(gen)
    for method in METHODS:
        m = select_blocks(q, k, torch.ones(2), SelectionSpec(method=method, block_size=32), 0.25)
        assert torch.equal(m, causal_block_mask(10, m.device).expand_as(m))
        assert torch.equal(achieved_sparsity(m), torch.zeros(2, dtype=torch.float64))


def test_topk_keeps_the_best_scoring_blocks(gen):
    q, k = rand_qk(gen, n=640)
    spec = SelectionSpec(block_size=32, sink_blocks=1, local_blocks=1)
    m = select_blocks(q, k, torch.tensor([0.3, 0.6]), spec, 0.25)
    scores = block_topk_scores(q, k, spec, 0.25)
    nb = m.shape[-1]
    forced = forced_block_mask(nb, spec, torch.zeros(2, dtype=torch.long))[:, None].expand_as(m)
    causal = causal_block_mask(nb, m.device).expand_as(m)
    chosen = m & ~forced
    rest = causal & ~m
    # ties-tolerant: compare scores, not indices
    lo = torch.where(chosen, scores, torch.full_like(scores, float("inf"))).amin(-1)
    hi = torch.where(rest, scores, torch.full_like(scores, float("-inf"))).amax(-1)
    assert (lo >= hi).all()


def test_accounting_counts_kept_over_causal_blocks(gen):
    m = torch.rand(3, 4, 9, 9, generator=gen) < 0.5
    m &= causal_block_mask(9, m.device)
    kept, causal = block_accounting(m)
    assert causal == 4 * 9 * 10 // 2
    assert torch.equal(kept, m.flatten(1).sum(1))
    assert torch.allclose(achieved_sparsity(m), 1 - kept.double() / causal)


def test_sink_follows_the_first_valid_block_under_left_padding(gen):
    q, k = rand_qk(gen, b=1, n=256)
    valid = torch.ones(1, 256, dtype=torch.bool)
    valid[:, :100] = False  # 100 padding tokens: first valid key sits in block 3 (block 32)
    spec = SelectionSpec(block_size=32, sink_blocks=1, local_blocks=1)
    m = select_blocks(q, k, torch.tensor([0.0]), spec, 0.25, key_valid=valid)
    assert m[0, :, 3:, 3].all() and not m[0, :, 5:, 0].any()


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError, match="unknown selection method"):
        SelectionSpec(method="nope")
    with pytest.raises(ValueError, match="power of two"):
        SelectionSpec(block_size=48)
