"""CUDA graphs of the Triton sparse step (sparse_kernels/graphs.py): the replayed layers give the
same logits and the same block counts as the eager ones, a failed capture runs eagerly, and the
accounting that graphs use (an accumulator tracked once, calls without a tensor) adds up."""
import logging

import pytest
import torch

from sparse_kernels import BlockCounts, SparsePlan, SelectionSpec, disable_sparse_attention, enable_sparse_attention, use_plan
from sparse_kernels.graphs import GRAPH_BELOW_TOKENS, StepGraphs, _Captured

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_counts_of_replayed_calls_arrive_through_the_tracked_accumulator():
    counts = BlockCounts()
    counts.add(torch.tensor([[[1, 2], [3, 0]], [[1, 1], [1, 1]]], dtype=torch.int32), causal=6)   # eager: [B, H, nq]
    acc = torch.zeros(2, dtype=torch.float64)
    counts.track(acc)
    for kept in ([2.0, 3.0], [1.0, 1.0]):   # two replays add on the device; the host only counts causal
        acc += torch.tensor(kept, dtype=torch.float64)
        counts.add(None, causal=6, rows=2)
    assert counts.rows == 2 and counts.causal_sparse == 18
    assert counts.rows_sparse.tolist() == [6.0 + 3.0, 4.0 + 4.0]
    assert counts.achieved_sparsity().tolist() == pytest.approx([1 - 9 / 18, 1 - 8 / 18])


def test_graphs_apply_only_to_unpadded_cuda_prefills_below_the_bound():
    """Host-bound prefills only: CUDA, no padding, fewer than GRAPH_BELOW_TOKENS rows x tokens."""
    q = torch.zeros(1, 2, 64, 16)
    assert not StepGraphs.applies(q, None)   # CPU
    if torch.cuda.is_available():
        assert StepGraphs.applies(q.cuda(), None)
        assert not StepGraphs.applies(q.cuda(), torch.ones(1, 64, dtype=torch.bool))
        assert not StepGraphs.applies(torch.zeros(1, 1, GRAPH_BELOW_TOKENS, 16, device="cuda"), None)
        assert not StepGraphs.applies(torch.zeros(4, 1, GRAPH_BELOW_TOKENS // 4, 16, device="cuda"), None)   # rows x length
        assert StepGraphs.applies(torch.zeros(4, 1, GRAPH_BELOW_TOKENS // 4 - 1, 16, device="cuda"), None)


def _logits(model, ids, graphs: bool, level: float = 0.8):
    plan = SparsePlan(levels=torch.full((ids.shape[0],), level, dtype=torch.float64),
                      selection=SelectionSpec(block_size=32), dense_layers=frozenset({0}), backend="triton",
                      cuda_graphs=graphs)
    previous = enable_sparse_attention(model)
    try:
        with torch.no_grad(), use_plan(plan):
            first = model(input_ids=ids).logits
            second = model(input_ids=ids).logits   # the same plan again: replays from the first layer on
    finally:
        disable_sparse_attention(model, previous)
    return first, second, plan


@pytest.mark.gpu
@cuda
def test_replayed_layers_equal_the_eager_ones_bit_for_bit():
    from data.tiny import tiny_random_llama
    model, _ = tiny_random_llama(dtype=torch.bfloat16, num_layers=6)
    model = model.cuda().eval()
    ids = torch.randint(100, 40000, (2, 1000), generator=torch.Generator().manual_seed(3)).cuda()
    eager = _logits(model, ids, graphs=False)
    graphed = _logits(model, ids, graphs=True)
    assert any(isinstance(g, _Captured) for g in graphed[2]._graphs._graphs.values())   # the graph path ran
    assert not eager[2]._graphs._graphs
    for a, b in zip(eager[:2], graphed[:2]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(graphed[2].counts.achieved_sparsity(), eager[2].counts.achieved_sparsity(), rtol=0, atol=0)
    assert 0.3 < float(eager[2].counts.achieved_sparsity()[0]) < 0.9


@pytest.mark.gpu
@cuda
def test_a_shape_that_cannot_be_captured_runs_eagerly(monkeypatch, caplog):
    from data.tiny import tiny_random_llama
    model, _ = tiny_random_llama(dtype=torch.bfloat16, num_layers=4)
    model = model.cuda().eval()
    ids = torch.randint(100, 40000, (1, 700), generator=torch.Generator().manual_seed(4)).cuda()
    eager = _logits(model, ids, graphs=False)

    def refuse(self, step):
        raise RuntimeError("capture refused (test)")
    monkeypatch.setattr(_Captured, "capture", refuse)
    with caplog.at_level(logging.WARNING, logger="sparse_kernels.graphs"):
        failed = _logits(model, ids, graphs=True)
    assert list(failed[2]._graphs._graphs.values()) == [None]
    assert sum("capture of the sparse step failed" in r.message for r in caplog.records) == 1
    for a, b in zip(eager[:2], failed[:2]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
