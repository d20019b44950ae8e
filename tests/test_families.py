"""The adapter on tiny random models of five architecture families, built offline from configs:
level 0 equals the unhooked model's logits, sparse levels equal the reference backend, sliding-window
layers are left exactly as the model defines them (never block-sparse), and attention the sparse
paths cannot honour (logit softcapping) is refused in one line."""
import pytest
import torch

import sparse_kernels.hf as adapter
from sparse_kernels import (SelectionSpec, SparsePlan, UnsupportedModel, disable_sparse_attention,
                            enable_sparse_attention, use_plan)

N, VOCAB, WINDOW, BLOCK = 150, 512, 48, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, attn_implementation="sdpa")
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def build(family: str):
    import transformers as tf
    configs = {
        "llama": lambda: tf.LlamaConfig(**COMMON),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, layer_types=SLIDING),
        "qwen3": lambda: tf.Qwen3Config(**COMMON),
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, sliding_window=WINDOW, layer_types=SLIDING,
                                              query_pre_attn_scalar=24),
        "gemma2": lambda: tf.Gemma2Config(**{**COMMON, "attn_implementation": "eager"}, sliding_window=WINDOW,
                                          attn_logit_softcapping=50.0),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = configs[family]()
        model = tf.Gemma3ForCausalLM(cfg) if family == "gemma3" else tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def sliding_layers(model) -> set[int]:
    """Layers the model itself runs with a sliding window (what transformers passes per layer)."""
    cfg = model.config
    if getattr(cfg, "layer_types", None) and getattr(cfg, "sliding_window", None):
        if cfg.model_type == "qwen2" and not cfg.use_sliding_window:
            return set()
        return {i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"}
    return set(range(cfg.num_hidden_layers)) if getattr(cfg, "sliding_window", None) else set()


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def _ids():
    return torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(0))


def _run(model, plan=None):
    with torch.no_grad():
        if plan is None:
            return model(input_ids=_ids()).logits
        previous = enable_sparse_attention(model)
        try:
            with use_plan(plan):
                return model(input_ids=_ids()).logits
        finally:
            disable_sparse_attention(model, previous)


def _plan(levels, dense_layers, backend):
    return SparsePlan(levels=torch.tensor(levels, dtype=torch.float64), selection=SelectionSpec(block_size=BLOCK),
                      dense_layers=frozenset(dense_layers), backend=backend)


@pytest.mark.parametrize("family", FAMILIES)
def test_level_zero_equals_the_unhooked_model(family):
    model = build(family)
    assert torch.equal(_run(model, _plan([0.0, 0.0], {0}, "reference")), _run(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_layers_are_never_block_sparse(family, monkeypatch):
    model = build(family)
    sliding, layers = sliding_layers(model), set(range(model.config.num_hidden_layers))
    assert family not in ("qwen2", "mistral", "gemma3") or sliding, "the test needs sliding layers"
    # every global layer dense: a sparse level may touch nothing, so logits equal the unhooked model's
    plan = _plan([0.9, 0.9], layers - sliding, "reference")
    assert torch.equal(_run(model, plan), _run(model))
    assert plan.counts.causal_sparse == 0
    # global layers sparse: each sliding layer still goes to SDPA with the model's own (window) mask
    dense_calls = []
    real = adapter.sdpa_attention_forward

    def traced(module, *a, **k):
        dense_calls.append(module.layer_idx)
        return real(module, *a, **k)
    monkeypatch.setattr(adapter, "sdpa_attention_forward", traced)
    plan = _plan([0.9, 0.9], {0} - sliding, "reference")
    _run(model, plan)
    assert set(dense_calls) == sliding | ({0} - sliding)
    nq = -(-N // BLOCK)   # the sparse share is counted over the global, non-dense layers only
    assert plan.counts.causal_sparse == len(layers - sliding - {0}) * 4 * nq * (nq + 1) // 2
    if layers - sliding - {0}:
        assert plan.counts.achieved_sparsity().min() > 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_levels_on_triton_equal_the_reference_backend(family):
    model = build(family)
    plan = lambda backend: _plan([0.0, 0.8], {0}, backend)  # noqa: E731
    ref, tri = _run(model, plan("reference")), _run(model, plan("triton"))
    assert torch.allclose(tri, ref, atol=2e-4, rtol=1e-3), (tri - ref).abs().max()


def test_sliding_layers_count_only_the_blocks_their_window_reaches():
    model = build("gemma3")
    plan = _plan([0.0, 0.0], {0, 1, 2, 3}, "reference")
    _run(model, plan)
    nq = -(-N // BLOCK)
    causal = 4 * nq * (nq + 1) // 2                       # heads x causal blocks of one layer
    reach = -(-WINDOW // BLOCK) + 1
    window = 4 * sum(min(i + 1, reach) for i in range(nq))
    assert plan.counts.dense_all == 2 * causal + 2 * window


def test_softcapped_attention_is_refused_in_one_line():
    model = build("gemma2")
    with pytest.raises(UnsupportedModel, match="attn_logit_softcapping=50.0") as err:
        enable_sparse_attention(model)
    assert "\n" not in str(err.value)
    assert model.config._attn_implementation == "eager"   # the model is left as it was


def test_a_sliding_window_cache_rolls_back_to_its_prompt_and_is_never_stacked():
    """Labeling decodes a sample several times from its prompt's cache. A full sliding-window layer
    cannot be cropped, so the batch restores the prompt-only tensors; the passes after a rollback
    equal a fresh pass over prompt + tokens."""
    from data.decode import DecodeBatch, cache_kwarg, cache_of
    model = build("gemma3")
    arg = cache_kwarg(model)
    ids, extra = _ids()[:1], torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = cache_of(out)
        batch = DecodeBatch.stack([cache], [out.logits[:, -1]], [N])
        passes = []
        for _ in range(2):
            passes.append(model(use_cache=True, **{arg: batch.cache}, **batch.inputs(extra, 0)).logits)
            batch.reset()
        fresh = model(input_ids=torch.cat([ids, extra], 1)).logits[:, N:]
    assert N > WINDOW
    torch.testing.assert_close(passes[0], passes[1], rtol=0, atol=0)
    torch.testing.assert_close(passes[1], fresh, rtol=1e-4, atol=1e-4)


def test_sliding_window_caches_of_different_lengths_decode_together_as_alone():
    """Prompts at least window - 1 tokens long hold exactly window - 1 tokens in their sliding
    layers, so they stack with no padding there (the full layers are left-padded as usual): the
    stacked pass equals each prompt's pass alone. A prompt shorter than the window cannot join."""
    from data.decode import DecodeBatch, cache_kwarg, cache_of
    model = build("gemma3")
    arg = cache_kwarg(model)
    g = torch.Generator().manual_seed(2)
    lengths = (WINDOW + 9, N)   # the first cache (the one the stack keeps) is the shorter prompt
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]
    extra = torch.randint(0, VOCAB, (1, 4), generator=g)

    def prefill(ids):
        out = model(input_ids=ids, use_cache=True)
        return cache_of(out), out.logits[:, -1]
    with torch.no_grad():
        alone = []
        for ids, n in zip(prompts, lengths):
            batch = DecodeBatch.stack(*[[x] for x in prefill(ids)], [n])
            alone.append(model(use_cache=True, **{arg: batch.cache}, **batch.inputs(extra, 0)).logits[0])
        caches, firsts = zip(*(prefill(ids) for ids in prompts))
        batch = DecodeBatch.stack(list(caches), list(firsts), list(lengths))
        together = model(use_cache=True, **{arg: batch.cache}, **batch.inputs(extra.expand(2, -1), 0)).logits
        batch.reset()
        again = model(use_cache=True, **{arg: batch.cache}, **batch.inputs(extra.expand(2, -1), 0)).logits
        short = prefill(prompts[1][:, :WINDOW // 2])
        long_again = prefill(prompts[1])
    for row in range(2):
        torch.testing.assert_close(together[row], alone[row], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, together, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one at a time"):
        DecodeBatch.stack([long_again[0], short[0]], [long_again[1], short[1]], [N, WINDOW // 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_layers_on_cuda_run_the_window_only_and_match_the_model(family):
    """On CUDA the adapter runs sliding-window layers with FlexAttention over the window's blocks:
    the logits at level 0 match the unhooked model's (SDPA under the full window mask)."""
    model = build(family).cuda()
    ids = _ids().cuda()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        previous = enable_sparse_attention(model)
        try:
            with use_plan(_plan([0.0, 0.0], [], "auto")):
                got = model(input_ids=ids).logits
        finally:
            disable_sparse_attention(model, previous)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_of_names_the_window_exactly_where_the_model_slides(family):
    from sparse_kernels import sliding_window_of
    model = build(family)
    assert sliding_window_of(model) == (WINDOW if sliding_layers(model) else None)
