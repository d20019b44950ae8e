"""The Triton probe kernel (`sparse_kernels/triton_probe.py`) against its plain-torch reference, and
the whole probe through it against the torch path: GQA, lengths not divisible by the block, query
counts not divisible by the tile, the first and last positions, 16- and 32-bit inputs. On CPU it
runs under TRITON_INTERPRET=1 on small shapes; on a GPU (marked) at SmolLM2's shape."""
import pytest
import torch

from sparse_kernels import triton_probe
from sparse_kernels.probes import PROBE_STATS, attention_probe
from sparse_kernels.select import SelectionSpec
from sparse_kernels.triton_attention import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(torch.device(DEVICE)), reason="triton is not installed")

SHAPES = [  # (B, Hq, Hkv, N, D, block, dtype)
    (1, 4, 2, 150, 16, 32, torch.float32),
    (2, 3, 1, 97, 32, 16, torch.float16),
    (1, 2, 2, 200, 64, 64, torch.float32),
    (1, 4, 1, 70, 256, 64, torch.float16),   # Gemma 3's head dim
    (1, 2, 1, 600, 16, 16, torch.float32),   # 38 key blocks: three runs of KEY_BLOCKS, the last short
]


def _positions(n: int) -> torch.Tensor:
    """19 query positions (not a multiple of the 16-query tile): the first, the last, block edges."""
    return torch.tensor([0, 1, 15, 16, 31, 32, 33, n // 2, n - 33, n - 32, n - 17, n - 16, n - 3, n - 2, n - 1,
                         n - 1, 7, n // 3, 63 % n])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s[:6])) + str(s[6])[-4:])
def test_block_stats_equal_the_reference(shape, gen):
    b, hq, hkv, n, d, block, dtype = shape
    q = torch.randn(b, hq, n, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype).to(DEVICE)
    pos = _positions(n).to(DEVICE)
    got = triton_probe.probe_block_stats(q, k, pos, 0.3, block)
    want = triton_probe.block_stats_reference(q, k, pos, 0.3, block)
    for name, x, y in zip(("max", "sum exp", "sum exp * logit"), got, want):
        assert x.shape == y.shape == (b, hq, pos.numel(), -(-n // block)), name
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4), (name, float((x - y).abs().nan_to_num(1e9).max()))
    # a key block past every probed position is empty: max -inf, sums 0
    assert torch.isneginf(got[0][:, :, 0, 1:]).all() and (got[1][:, :, 0, 1:] == 0).all()


@pytest.mark.parametrize("method", ["block_topk", "vertical_slash"])
def test_probe_through_the_kernel_equals_the_torch_path(method, monkeypatch, gen):
    q, k = torch.randn(2, 4, 300, 32, generator=gen).to(DEVICE), torch.randn(2, 2, 300, 32, generator=gen).to(DEVICE)
    calls = []
    real = triton_probe.probe_block_stats
    monkeypatch.setattr(triton_probe, "probe_block_stats", lambda *a: calls.append(1) or real(*a))
    spec = SelectionSpec(method=method, block_size=32)
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "1")
    fused = attention_probe(q, k, 0.2, 40, 32, None, spec)
    assert calls, "the Triton path did not run"
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "0")
    plain = attention_probe(q, k, 0.2, 40, 32, None, spec)
    assert len(calls) == 1 and set(fused) == set(plain) == set(PROBE_STATS)
    for s in PROBE_STATS:
        assert torch.allclose(fused[s], plain[s], atol=2e-5), (s, fused[s], plain[s])


def test_padded_rows_take_the_torch_path(monkeypatch, gen):
    q, k = torch.randn(2, 4, 200, 16, generator=gen).to(DEVICE), torch.randn(2, 2, 200, 16, generator=gen).to(DEVICE)
    valid = torch.ones(2, 200, dtype=torch.bool, device=DEVICE)
    valid[1, :40] = False
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "1")
    monkeypatch.setattr(triton_probe, "probe_block_stats", lambda *a: pytest.fail("the kernel has no padding mask"))
    out = attention_probe(q, k, 0.2, 32, 32, valid, SelectionSpec(block_size=32))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_the_switch(monkeypatch):
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "yes")
    with pytest.raises(ValueError, match="SPARSE_FUSED_PROBE must be 0 or 1"):
        triton_probe.fused_probe_enabled(torch.device("cpu"), 64)
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "0")
    assert not triton_probe.fused_probe_enabled(torch.device(DEVICE), 64)
    monkeypatch.delenv("SPARSE_FUSED_PROBE")
    assert not triton_probe.fused_probe_enabled(torch.device("cpu"), 64)   # unset: CUDA only
    if torch.cuda.is_available():   # and only at the head dims whose GPU test has passed
        assert triton_probe.fused_probe_enabled(torch.device("cuda"), 64)
        assert triton_probe.fused_probe_enabled(torch.device("cuda"), 256)
        assert not triton_probe.fused_probe_enabled(torch.device("cuda"), 128)
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "1")
    assert triton_probe.fused_probe_enabled(torch.device(DEVICE), 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 1, 256)])   # SmolLM2's and Gemma 3's heads
@pytest.mark.parametrize("n", [8192, 32768])
def test_full_size_on_gpu(n, hq, hkv, d, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    spec = SelectionSpec(block_size=64)
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "1")
    fused = attention_probe(q, k, d ** -0.5, 64, 64, None, spec)
    monkeypatch.setenv("SPARSE_FUSED_PROBE", "0")
    plain = attention_probe(q, k, d ** -0.5, 64, 64, None, spec)
    for s in PROBE_STATS:
        assert torch.allclose(fused[s], plain[s], atol=1e-4), (s, fused[s], plain[s])
