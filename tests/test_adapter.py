"""The transformers adapter on the tiny model: level 0 is exact, rows are independent,
decode stays dense, probes run where configured, padding is handled."""
import pytest
import torch

from sparse_kernels import (SelectionSpec, SparsePlan, disable_sparse_attention, enable_sparse_attention,
                            use_plan)


def make_plan(levels, **kw):
    args = dict(selection=SelectionSpec(block_size=32), dense_layers=frozenset({0}))
    args.update(kw)
    return SparsePlan(levels=torch.tensor(levels, dtype=torch.float64), **args)


@pytest.fixture
def model(tiny_lm):
    m = tiny_lm.model
    previous = enable_sparse_attention(m)
    yield m
    disable_sparse_attention(m, previous)


def test_level_zero_reproduces_unhooked_logits_exactly(tiny_lm, gen):
    ids = torch.randint(0, 40000, (2, 200), generator=gen)
    with torch.no_grad():
        dense = tiny_lm.model(ids).logits
        previous = enable_sparse_attention(tiny_lm.model)
        with use_plan(make_plan([0.0, 0.0])) as plan:
            hooked = tiny_lm.model(ids).logits
        disable_sparse_attention(tiny_lm.model, previous)
        restored = tiny_lm.model(ids).logits
    assert torch.equal(dense, hooked) and torch.equal(dense, restored)
    assert torch.equal(plan.counts.achieved_sparsity(), torch.zeros(2, dtype=torch.float64))


def test_rows_are_independent_of_other_rows_levels(model, gen):
    ids = torch.randint(0, 40000, (1, 257), generator=gen).expand(3, -1)
    with torch.no_grad(), use_plan(make_plan([0.0, 0.6, 0.9])) as plan:
        mixed = model(ids).logits
    with torch.no_grad(), use_plan(make_plan([0.6])):
        alone = model(ids[:1]).logits
    torch.testing.assert_close(mixed[1], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2])
    s = plan.counts.achieved_sparsity()
    assert s[0] == 0 and 0 < s[1] < s[2] < 0.9


def test_dense_layers_and_probes(model, gen):
    seen = []
    plan = make_plan([0.8], dense_layers=frozenset({0, 1}), probe_layers=frozenset({0, 1}),
                     on_probe=lambda layer, stats: seen.append((layer, stats)))
    with torch.no_grad(), use_plan(plan):
        model(torch.randint(0, 40000, (1, 150), generator=gen))
    assert [layer for layer, _ in seen] == [0, 1]
    assert all(torch.isfinite(v).all() for _, st in seen for v in st.values())
    # 4 layers, 2 dense: sparse accounting covers exactly the 2 sparse layers
    nq = 5
    assert plan.counts.causal_sparse == 2 * 4 * nq * (nq + 1) // 2
    assert plan.counts.causal_all == 4 * 4 * nq * (nq + 1) // 2


def test_a_row_at_level_zero_in_a_mixed_batch_runs_sdpa_like_an_all_dense_batch(model, gen, monkeypatch):
    """The labeler's dense reference row, and a request decided dense next to sparse ones, get the
    dense path's attention (SDPA), not the sparse kernel at density 1."""
    from sparse_kernels import hf
    rows_seen = []
    for name, fn in list(hf.BACKENDS.items()):
        monkeypatch.setitem(hf.BACKENDS, name, lambda q, *a, fn=fn, **k: rows_seen.append(q.shape[0]) or fn(q, *a, **k))
    ids = torch.randint(0, 40000, (1, 230), generator=gen).expand(3, -1)
    with torch.no_grad():
        with use_plan(make_plan([0.0, 0.0, 0.0])):
            dense = model(ids).logits
        with use_plan(make_plan([0.0, 0.8, 0.0])) as plan:
            mixed = model(ids).logits
        with use_plan(make_plan([0.8])):
            alone = model(ids[:1]).logits
    assert rows_seen == [1] * 3 + [1] * 3   # the mixed batch's sparse layers, then the row alone: one row each
    assert torch.equal(mixed[0], dense[0]) and torch.equal(mixed[2], dense[2])
    torch.testing.assert_close(mixed[1], alone[0], atol=1e-5, rtol=1e-5)
    s = plan.counts.achieved_sparsity()
    assert s[0] == 0 and s[2] == 0 and 0.5 < s[1] < 0.8


def test_decode_stays_dense_and_generate_works(model, gen):
    ids = torch.randint(0, 40000, (1, 100), generator=gen)
    with torch.no_grad(), use_plan(make_plan([0.9])) as plan:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 104)
    # only the prefill is counted: one pass over the 3 sparse layers
    assert plan.counts.causal_sparse == 3 * 4 * 4 * 5 // 2


def test_left_padded_batch_gives_finite_logits(model, tiny_lm, gen):
    tok = tiny_lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:  # some transformers versions read no pad token from the GGUF
        tok.pad_token = tok.eos_token
    batch = tok(["short text " * 5, "a much longer text with many words " * 20], return_tensors="pt", padding=True)
    with torch.no_grad(), use_plan(make_plan([0.7, 0.7])):
        logits = model(**batch).logits
    assert torch.isfinite(logits[:, -1]).all()
    with torch.no_grad():   # a padded batch mixing a dense row with a sparse one: the dense row as if all were dense
        with use_plan(make_plan([0.0, 0.7])):
            mixed = model(**batch).logits
        with use_plan(make_plan([0.0, 0.0])):
            dense = model(**batch).logits
    assert torch.equal(mixed[0], dense[0]) and torch.isfinite(mixed[1, -1]).all()


def test_plan_rejects_bad_levels_and_probes_above_sparse_layers():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_plan([1.0])
    with pytest.raises(ValueError, match=r"read layers \[1, 2\], which are not dense"):
        make_plan([0.5], probe_layers=frozenset({3}))
    with pytest.raises(ValueError, match=r"read layers \[0\]"):
        make_plan([0.5], dense_layers=frozenset({1}), probe_layers=frozenset({1}))
    make_plan([0.5], probe_layers=frozenset({0, 1}))   # layer 1: probed, then sparse
    make_plan([0.5], dense_layers=frozenset(), probe_layers=frozenset({0}))


def test_a_sparse_probe_layer_is_probed_then_decided_then_run_at_the_level(model, gen):
    """dense {0}, probes {0, 1}: layer 1's statistics come before its attention, the deferred
    decision follows them in the same layer, and layer 1 runs sparse at the decided level."""
    events = []

    def decide():
        events.append("decide")
        plan.set_levels(torch.tensor([0.8], dtype=torch.float64))

    plan = make_plan([0.0], probe_layers=frozenset({0, 1}), on_probe=lambda layer, stats: events.append(layer),
                     before_sparse=decide)
    plan.levels = None   # undecided until `decide`
    with torch.no_grad(), use_plan(plan):
        model(torch.randint(0, 40000, (1, 150), generator=gen))
    assert events == [0, 1, "decide"]
    nq = 5
    assert plan.counts.causal_sparse == 3 * 4 * nq * (nq + 1) // 2   # layers 1-3 sparse, layer 1 included
    assert 0 < float(plan.counts.achieved_sparsity()[0]) < 0.8


def test_probe_statistics_do_not_depend_on_the_probe_layers_own_level(model, gen):
    """The features a sparse last probe layer gives equal those of the same layer run dense."""
    ids = torch.randint(0, 40000, (1, 230), generator=gen)
    seen = {}
    for name, dense in (("dense", {0, 1}), ("sparse", {0})):
        stats = []
        plan = make_plan([0.9], dense_layers=frozenset(dense), probe_layers=frozenset({0, 1}),
                         on_probe=lambda layer, st: stats.append((layer, st)))
        with torch.no_grad(), use_plan(plan):
            logits = model(ids).logits
        seen[name] = (stats, logits, plan.counts.causal_sparse)
    (a, la, ca), (b, lb, cb) = seen["dense"], seen["sparse"]
    assert [layer for layer, _ in a] == [layer for layer, _ in b] == [0, 1]
    for (_, sa), (_, sb) in zip(a, b):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cb > ca and not torch.equal(la, lb)   # layer 1 did run sparse


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_batch_on_the_gpu_dense_rows_equal_an_all_dense_batch_bit_for_bit():
    """The Triton path: level-0 rows next to sparse rows give the all-dense batch's logits exactly."""
    from data.tiny import tiny_random_llama
    model, _ = tiny_random_llama(dtype=torch.bfloat16, num_layers=4)
    model = model.cuda().eval()
    previous = enable_sparse_attention(model)
    ids = torch.randint(100, 40000, (1, 1500), generator=torch.Generator().manual_seed(5)).cuda().expand(3, -1)
    try:
        with torch.no_grad():
            with use_plan(make_plan([0.0, 0.0, 0.0], backend="triton")):
                dense = model(input_ids=ids).logits
            with use_plan(make_plan([0.0, 0.9, 0.0], backend="triton")) as plan:
                mixed = model(input_ids=ids).logits
    finally:
        disable_sparse_attention(model, previous)
    torch.testing.assert_close(mixed[0], dense[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], dense[2], rtol=0, atol=0)
    s = plan.counts.achieved_sparsity()
    assert s[0] == 0 and s[2] == 0 and 0.5 < s[1] < 0.9
