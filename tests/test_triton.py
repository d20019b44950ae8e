"""The Triton block-sparse kernel against the plain-torch reference: random inputs and indices,
GQA, lengths not divisible by the block, per-row levels, empty rows; outputs poisoned first.
On CPU it runs under TRITON_INTERPRET=1 on small shapes; on a GPU (marked) at full sizes."""
import math

import pytest
import torch

from sparse_kernels import SelectionSpec, select_blocks
from sparse_kernels.flex import kv_index
from sparse_kernels.reference import reference_attention
from sparse_kernels.triton_attention import available, block_sparse_attention

pytestmark = pytest.mark.skipif(not available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 5e-3 if DEVICE == "cuda" else 1e-4  # on GPUs tl.dot takes fp32 inputs as TF32


def random_block_mask(b, h, n, block, keep, gen):
    """Random causal block mask; some rows lose their diagonal block, one row keeps nothing."""
    nq = -(-n // block)
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    mask = (torch.rand(b, h, nq, nq, generator=gen) < keep) & causal
    mask[..., 0, 0] = True
    mask[0, 0, -1] = False  # a query block with no key at all -> zeros
    return mask


def brute_force(q, k, v, mask, block, scale):
    """float64 attention with lse over the visible keys (token mask from the block mask + causal)."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    tok = mask.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :n, :n]
    tok = tok & torch.ones(n, n, dtype=torch.bool).tril().to(tok.device)
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ vv, lse


SHAPES = [  # (B, Hq, Hkv, N, D, block, dtype)
    (2, 4, 2, 97, 16, 32, torch.float32),
    (1, 3, 1, 130, 64, 64, torch.float32),
    (2, 2, 2, 64, 32, 16, torch.float16),
    (1, 6, 3, 75, 128, 64, torch.float16),
    (1, 4, 1, 90, 256, 64, torch.float16),   # Gemma 3's shape: multi-query, head dim 256
    (1, 2, 1, 70, 256, 32, torch.float32),
]


@pytest.mark.parametrize("loop", ["split", "masked"])
@pytest.mark.parametrize("loads", ["pointer", "tma"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s[:6])) + str(s[6])[-4:])
def test_kernel_matches_brute_force_and_reference(shape, loads, loop, gen):
    b, hq, hkv, n, d, block, dtype = shape
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    mask = random_block_mask(b, hq, n, block, 0.5, gen)
    scale = 1 / math.sqrt(d)
    counts, idx = kv_index(mask)
    q, k, v, counts, idx = (t.to(DEVICE) for t in (q, k, v, counts, idx))
    out, lse = block_sparse_attention(q, k, v, counts, idx, block, scale, loads=loads, loop=loop)
    want, want_lse = brute_force(q.cpu(), k.cpu(), v.cpu(), mask, block, scale)
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.cpu().double() - want).norm() / want.norm()) < tol
    empty = torch.isinf(want_lse)
    assert empty.any() and (out.cpu()[empty] == 0).all() and torch.isneginf(lse.cpu()[empty]).all()
    assert torch.allclose(lse.cpu()[~empty].double(), want_lse[~empty], atol=tol * 10)
    ref = reference_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), mask, block, scale)
    assert ((out.cpu().float() - ref).norm() / ref.norm()) < tol


def test_every_output_element_is_written(gen, monkeypatch):
    """Poison the output buffers: any element the kernel does not write stays NaN/garbage."""
    b, hq, hkv, n, d, block = 1, 2, 1, 70, 16, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv))
    mask = random_block_mask(b, hq, n, block, 0.6, gen)
    counts, idx = kv_index(mask)
    poisoned = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        poisoned.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    out, lse = block_sparse_attention(q, k, v, counts.to(DEVICE), idx.to(DEVICE), block)
    monkeypatch.undo()
    # out may be a view (the kernel stores [B, N, Hq, D]): its whole buffer must have been poisoned
    assert any(p.data_ptr() == out.data_ptr() and p.numel() == out.numel() for p in poisoned)
    assert any(p is lse for p in poisoned)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_rows_at_different_levels_through_the_selector(gen):
    """The selector's per-row masks (batch rows at different levels) through the triton backend."""
    from sparse_kernels.backends import BACKENDS
    b, hq, hkv, n, d = 3, 4, 2, 150, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    mask = select_blocks(q, k, torch.tensor([1.0, 0.5, 0.2]), SelectionSpec(block_size=32), 1 / math.sqrt(d))
    out = BACKENDS["triton"](q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), 32, 1 / math.sqrt(d), None, None)
    ref = BACKENDS["reference"](q, k, v, mask, 32, 1 / math.sqrt(d), None, None)
    assert ((out.cpu() - ref).norm() / ref.norm()) < FP32_TOL


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 3, 64, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        block_sparse_attention(q, torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16),
                               torch.zeros(1, 3, 2, dtype=torch.int32), torch.zeros(1, 3, 2, 2, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="index must be"):
        block_sparse_attention(q, torch.zeros(1, 1, 64, 16), torch.zeros(1, 1, 64, 16),
                               torch.zeros(1, 3, 5, dtype=torch.int32), torch.zeros(1, 3, 5, 5, dtype=torch.int32), 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d,block", [(32, 8, 128, 128), (32, 8, 128, 64), (9, 3, 64, 64), (9, 3, 64, 128),
                                            (4, 1, 256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loads", ["pointer", "tma"])
def test_full_size_on_gpu(hq, hkv, d, block, dtype, loads):
    gen = torch.Generator().manual_seed(hq * d + block)
    n = 4096 + 37
    q, k, v = (torch.randn(1, h, n, d, generator=gen).to("cuda", dtype) for h in (hq, hkv, hkv))
    mask = random_block_mask(1, hq, n, block, 0.2, gen).cuda()
    counts, idx = kv_index(mask)
    out, lse = block_sparse_attention(q, k, v, counts, idx, block, loads=loads)
    ref = reference_attention(q.float(), k.float(), v.float(), mask, block, 1 / math.sqrt(d))
    assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_benchmark_rows_carry_the_promised_fields(monkeypatch, capsys):
    """The benchmark's row builder on CPU (interpreter, eager flex, a stub timer): fields and the
    triton-vs-flex agreement check. Timing itself happens only on the GPU."""
    import sparse_kernels.bench as bench
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "_compiled_flex", lambda: flex_attention)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 200, 16, generator=gen).to(DEVICE) for h in (4, 2, 2))
    row = bench.bench_point(q, k, v, None, None, 0.3, 32, 2.0)
    assert {"N", "kept", "hq", "hkv", "d", "ms_sdpa", "ms_flex", "ms_triton", "ms_select", "triton_over_ideal"} <= set(row)
    assert 0.3 <= row["kept"] < 1 and row["rel_diff_triton_flex"] < FP32_TOL and "errors" not in row, row.get("errors")
    assert row["fused_select_equal"] and row["ms_select_torch"] == 1.0 and row["select_share"] == 1.0
    assert "SPLIT: True" in row["triton_config"]   # the interpreter's one config: the split loop
    assert bench.kernel_table([row]).count("\n") == 2
    import controller.experiments.benchmark as cli
    if not torch.cuda.is_available():
        assert cli.main(["--out", "unused.json"]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_index_from_topk_gives_the_mask_path_result(gen):
    """The index straight from top-k (torch and fused: ids ascending, as the split loop reads
    them) and the sorted index of the mask agree."""
    from sparse_kernels.select import select_blocks_with_index
    b, hq, hkv, n, d = 3, 4, 2, 170, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    for density in (torch.tensor([1.0, 0.5, 0.2]), torch.ones(3)):
        mask, counts, idx = select_blocks_with_index(q, k, density, SelectionSpec(block_size=32), 0.25)
        assert torch.equal(counts.long(), mask.sum(-1))
        kept = torch.arange(idx.shape[-1]) < counts[..., None]
        rising = torch.where(kept[..., 1:], idx[..., 1:] - idx[..., :-1], 1)
        assert (rising > 0).all() and (idx <= torch.arange(idx.shape[2])[:, None]).where(kept, True).all()
        assert torch.equal(torch.zeros_like(mask).scatter_(-1, idx.long(), torch.arange(idx.shape[-1]) < counts[..., None]), mask)
        a = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), counts.to(DEVICE), idx.to(DEVICE), 32, 0.25)[0]
        c, i = kv_index(mask)
        ref = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), c.to(DEVICE), i.to(DEVICE), 32, 0.25)[0]
        assert ((a - ref).norm() / ref.norm()) < FP32_TOL


def test_model_forward_on_the_triton_backend_matches_reference(tiny_lm, gen):
    """The transformers adapter with backend=triton (per-row levels) against backend=reference."""
    from sparse_kernels import SparsePlan, enable_sparse_attention, use_plan
    enable_sparse_attention(tiny_lm.model)
    ids = torch.randint(0, 1000, (1, 150), generator=gen).expand(3, -1)
    logits = {}
    for backend in ("reference", "triton"):
        plan = SparsePlan(levels=torch.tensor([0.0, 0.5, 0.9]), selection=SelectionSpec(block_size=32),
                          dense_layers=frozenset({0}), backend=backend)
        with use_plan(plan), torch.no_grad():
            logits[backend] = tiny_lm.model(input_ids=ids).logits
        logits[backend + "_achieved"] = plan.counts.achieved_sparsity()
    assert torch.allclose(logits["triton"], logits["reference"], atol=1e-3, rtol=1e-3)
    assert torch.equal(logits["triton_achieved"], logits["reference_achieved"])
    assert logits["triton_achieved"][2] > logits["triton_achieved"][1] > 0


@pytest.mark.parametrize("b,h,nq,sinks", [(2, 3, 13, (0, 2)), (1, 2, 40, (5,)), (3, 1, 1, (0, 0, 0))])
def test_fused_topk_equals_the_torch_selection(b, h, nq, sinks, gen):
    """Counts (computed in the kernel from the densities), mask and kept ids (both ascending) against
    the torch top-k; the index is only as wide as the host-side bound and the mask can be skipped."""
    from sparse_kernels.select import forced_block_mask, kept_block_counts, topk_block_index
    from sparse_kernels.triton_select import topk_index_triton
    spec = SelectionSpec(block_size=32, sink_blocks=1, local_blocks=2)
    scores = torch.randn(b, h, nq, nq, generator=gen)
    scores[0, 0, -1, 0] = float("nan")
    sink = torch.tensor(sinks)
    forced = forced_block_mask(nq, spec, sink)
    density = torch.rand(b, generator=gen, dtype=torch.float64)
    density[0] = 0.2  # 0.2 * 5 is 1.0000000149 in float32: the kernel must count in float64
    counts = kept_block_counts(density, nq, forced.sum(-1))
    want, top = topk_block_index(scores, counts, forced)
    kmax = int(counts.max())
    mask, c, idx = topk_index_triton(scores.to(DEVICE), density, sink, 1, 2, kmax)
    assert idx.shape[-1] == kmax and torch.equal(mask.cpu(), want)
    assert torch.equal(c.cpu().long(), want.sum(-1)) and torch.equal(c.cpu().long(), counts[:, None].expand(b, h, nq))
    for bb in range(b):
        for hh in range(h):
            for i in range(nq):
                n = int(counts[bb, i])
                # the same ids in the same (ascending) order: the kernel's split loop relies on it
                assert idx[bb, hh, i, :n].tolist() == top[bb, hh, i, :n].tolist() == sorted(top[bb, hh, i, :n].tolist())
    no_mask, c2, idx2 = topk_index_triton(scores.to(DEVICE), density, sink, 1, 2, kmax, with_mask=False)
    assert no_mask is None and torch.equal(c2, c)


def test_pooling_kernel_equals_torch_pooling(gen):
    from sparse_kernels.select import pool_blocks
    from sparse_kernels.triton_select import pool_blocks_triton
    for n, block, dtype in ((100, 32, torch.float32), (64, 16, torch.float16)):
        x = torch.randn(2, 3, n, 16, generator=gen).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
        got = pool_blocks_triton(x.to(DEVICE), block).cpu()
        assert got.dtype == torch.float32 and torch.allclose(got, pool_blocks(x, block, None), atol=1e-5)


@pytest.mark.parametrize("method,padded", [("block_topk", False), ("vertical_slash", False), ("block_topk", True)])
def test_selection_with_the_fused_topk_switch(method, padded, monkeypatch, gen):
    """Whole selection, torch path vs Triton path (pooling + fused top-k), per-row densities."""
    from sparse_kernels.backends import selection
    from sparse_kernels.select import block_accounting, index_accounting, select_blocks_with_index
    dev = torch.device(DEVICE)
    q, k = torch.randn(2, 4, 300, 16, generator=gen), torch.randn(2, 2, 300, 16, generator=gen)
    density = torch.tensor([0.3, 0.6])
    valid = torch.ones(2, 300, dtype=torch.bool)
    if padded:
        valid[1, :70] = False
    spec = SelectionSpec(method=method, block_size=32)
    monkeypatch.setenv("SPARSE_FUSED_TOPK", "0")
    assert selection(dev) is None
    plain = select_blocks_with_index(q, k, density, spec, 0.25, valid if padded else None, fused=selection(dev))
    monkeypatch.setenv("SPARSE_FUSED_TOPK", "1")
    triton_select = selection(dev)
    assert triton_select is not None
    fused = select_blocks_with_index(q.to(DEVICE), k.to(DEVICE), density, spec, 0.25,
                                     valid.to(DEVICE) if padded else None, fused=triton_select)
    # ties among empty (all-padding, score -inf) blocks may break either way: compare the others
    nonempty = torch.nn.functional.pad(valid, (0, 20)).view(2, -1, 32).any(-1)[:, None, None, :] if padded else torch.ones(1, dtype=torch.bool)
    assert torch.equal(fused[0].cpu() & nonempty, plain[0] & nonempty) and torch.equal(fused[1].cpu(), plain[1])
    index_only = select_blocks_with_index(q.to(DEVICE), k.to(DEVICE), density, spec, 0.25,
                                          valid.to(DEVICE) if padded else None, with_mask=False, fused=triton_select)
    assert index_only[0] is None and torch.equal(index_only[1].cpu(), plain[1])
    kept, causal = index_accounting(index_only[1].cpu())
    want_kept, want_causal = block_accounting(plain[0])
    assert torch.equal(kept.long(), want_kept) and causal == want_causal
    monkeypatch.setenv("SPARSE_FUSED_TOPK", "yes")
    with pytest.raises(ValueError, match="SPARSE_FUSED_TOPK must be 0 or 1"):
        selection(dev)
