"""Attention backends against dense SDPA and a brute-force masked attention in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_kernels.flex import flex_block_attention, kv_index
from sparse_kernels.reference import reference_attention
from sparse_kernels.select import SelectionSpec, causal_block_mask, select_blocks


def brute_force(q, k, v, block_mask, bs, scale, key_valid=None):
    """Loop-free but independent: float64, explicit softmax, repeat K/V per group."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    i = torch.arange(n)
    allowed = block_mask[:, :, i // bs][:, :, :, i // bs] & (i[None, :] <= i[:, None])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


SHAPES = [(1, 4, 4, 128, 16, 32), (2, 6, 2, 301, 16, 32), (3, 9, 3, 200, 64, 64), (2, 8, 1, 77, 32, 16)]


@pytest.mark.parametrize("b,hq,hkv,n,d,bs", SHAPES)
def test_reference_equals_dense_sdpa_at_density_one(gen, b, hq, hkv, n, d, bs):
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    nb = -(-n // bs)
    full = causal_block_mask(nb, q.device).expand(b, hq, nb, nb)
    out = reference_attention(q, k, v, full, bs, 1 / math.sqrt(d))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=hq != hkv)
    assert torch.equal(out, dense)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("b,hq,hkv,n,d,bs", SHAPES)
@pytest.mark.parametrize("method", ["block_topk", "vertical_slash"])
def test_reference_and_flex_match_brute_force_at_random_densities(gen, b, hq, hkv, n, d, bs, method):
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    density = torch.rand(b, generator=gen)
    spec = SelectionSpec(method=method, block_size=bs)
    m = select_blocks(q, k, density, spec, d ** -0.5)
    want = brute_force(q, k, v, m, bs, d ** -0.5)
    ref = reference_attention(q, k, v, m, bs, d ** -0.5)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)
    flex = flex_block_attention(q, k, v, m, bs, d ** -0.5)
    torch.testing.assert_close(flex.double(), want, atol=1e-5, rtol=1e-5)


def test_random_block_masks_and_padding(gen):
    b, hq, hkv, n, d, bs = 2, 4, 2, 150, 16, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    nb = -(-n // bs)
    m = (torch.rand(b, hq, nb, nb, generator=gen) < 0.4) & causal_block_mask(nb, q.device)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :40] = False
    attn = valid[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    want = brute_force(q, k, v, m, bs, 0.25, valid)
    ref = reference_attention(q, k, v, m, bs, 0.25, attn_mask=attn)
    assert not ref.isnan().any(), "fully masked rows must give zeros, not NaN"
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)
    flex = flex_block_attention(q, k, v, m, bs, 0.25, key_valid=valid)
    torch.testing.assert_close(flex.double(), want, atol=1e-5, rtol=1e-5)


def test_kv_index_lists_kept_blocks_first_ascending():
    m = torch.tensor([[[[1, 0, 0], [0, 1, 0], [1, 0, 1]]]], dtype=torch.bool)
    counts, idx = kv_index(m)
    assert counts.tolist() == [[[1, 1, 2]]]
    assert idx[0, 0, 2, :2].tolist() == [0, 2] and idx[0, 0, 1, 0] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_on_gpu_matches_reference_bf16(gen):
    b, hq, hkv, n, d, bs = 2, 32, 8, 4096 + 77, 128, 64
    q, k, v = (torch.randn(b, h, n, d, generator=gen).cuda().bfloat16() for h in (hq, hkv, hkv))
    m = select_blocks(q, k, torch.tensor([0.2, 0.9]), SelectionSpec(block_size=bs), d ** -0.5)
    ref = reference_attention(q, k, v, m, bs, d ** -0.5).float()
    out = torch.full_like(q, float("nan"))
    out.copy_(flex_block_attention(q, k, v, m, bs, d ** -0.5))
    assert not out.isnan().any()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _window_brute_force(q, k, v, window, scale):
    n, g = q.shape[2], q.shape[1] // k.shape[1]
    i = torch.arange(n, device=q.device)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v.double().repeat_interleave(g, 1)


@pytest.mark.parametrize("b,hq,hkv,n,d,window", [(1, 4, 1, 150, 16, 48), (2, 6, 2, 301, 16, 128),
                                                  (1, 4, 4, 129, 32, 129), (2, 8, 1, 77, 32, 512),
                                                  (1, 2, 1, 400, 16, 1)])
def test_sliding_window_attention_equals_the_windowed_brute_force(gen, b, hq, hkv, n, d, window):
    from sparse_kernels.flex import sliding_window_attention
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    out = sliding_window_attention(q, k, v, window, d ** -0.5)
    torch.testing.assert_close(out.double(), _window_brute_force(q, k, v, window, d ** -0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliding_window_attention_on_gpu_bf16(gen):
    from sparse_kernels.flex import sliding_window_attention
    b, hq, hkv, n, d, window = 2, 4, 1, 4096 + 77, 256, 512
    q, k, v = (torch.randn(b, h, n, d, generator=gen).cuda().bfloat16() for h in (hq, hkv, hkv))
    ref = _window_brute_force(q, k, v, window, d ** -0.5).float()
    out = sliding_window_attention(q, k, v, window, d ** -0.5).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
