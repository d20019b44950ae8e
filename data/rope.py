"""Training-free RoPE extension: a model option that stretches a Llama-like model's window.

Owns `RopeScaling` (the `model.rope_scaling` config: `type` yarn or linear, `factor`),
`LONG_ALIASES` (names such as `smollm2-135m-64k`: a base model plus the scaling measured best for
it, docs/results/long_context.md), `apply_rope_scaling` (rebuilds the model's rotary embedding
through transformers' own RoPE functions and widens `max_position_embeddings` by the factor) and
`rope_identity` (what the fingerprint records, so stores and checkpoints never mix a stretched model
with its native one). Imports nothing from this project but `data.errors`.

Dynamic NTK scaling is not offered: transformers recomputes its frequencies from the longest row of
each forward, so a request's logits would depend on what it is batched with, and change mid-decode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

ROPE_TYPES = ("yarn", "linear")


@dataclass(frozen=True)
class RopeScaling:
    type: str = "yarn"      # yarn or linear (transformers' rope types of those names)
    factor: float = 8.0     # window multiplier: 8 turns SmolLM2's 8,192 positions into 65,536

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise UserError(f"model.rope_scaling.type must be one of {list(ROPE_TYPES)}, got {self.type!r}")
        if not (isinstance(self.factor, (int, float)) and 1.0 < float(self.factor) <= 64.0):
            raise UserError(f"model.rope_scaling.factor must be a number in (1, 64], got {self.factor!r}")


# alias -> (base model alias, scaling). Chosen by the dense quality table of docs/results/long_context.md.
LONG_ALIASES: dict[str, tuple[str, RopeScaling]] = {
    "smollm2-135m-64k": ("smollm2-135m", RopeScaling("yarn", 8.0)),
}


def as_scaling(value) -> RopeScaling | None:
    """A RopeScaling from a RopeScaling, a mapping (a store's or checkpoint's record) or None."""
    if value is None or isinstance(value, RopeScaling):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"type", "factor", "original_window"})
        if unknown:
            raise UserError(f"model.rope_scaling: unknown key(s) {unknown}; known: type, factor")
        return RopeScaling(value.get("type", "yarn"), value.get("factor", 8.0))
    raise UserError(f"model.rope_scaling must be a mapping like {{type: yarn, factor: 8}}, got {value!r}")


def resolve_alias(name: str, scaling) -> tuple[str, RopeScaling | None]:
    """(the model to load, the scaling to apply): a long alias names both; an explicit scaling
    that contradicts the alias's is refused."""
    scaling = as_scaling(scaling)
    if name not in LONG_ALIASES:
        return name, scaling
    base, own = LONG_ALIASES[name]
    if scaling is not None and scaling != own:
        raise UserError(f"model {name!r} already sets rope_scaling {own}; drop model.rope_scaling, or name "
                        f"the base model {base!r} with your own scaling")
    return base, own


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rotary_modules(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) of every rotary embedding (a module with `inv_freq` and `rope_type`)."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if hasattr(child, "inv_freq") and hasattr(child, "rope_type"):
                found.append((parent, attr, child))
    return found


def apply_rope_scaling(model, scaling) -> None:
    """Stretch `model`'s RoPE in place by `scaling` (None: leave it). The config records the new rope
    parameters and a window of factor x the original; the rotary modules are rebuilt from it."""
    scaling = as_scaling(scaling)
    if scaling is None:
        return
    cfg = _text_config(model)
    params = getattr(cfg, "rope_parameters", None)
    rotary = _rotary_modules(model)
    if not isinstance(params, dict) or "rope_type" not in params or len(rotary) != 1:
        raise UserError(f"model.rope_scaling needs a model with one RoPE for all layers (Llama-like); "
                        f"{getattr(cfg, 'model_type', type(model).__name__)} has {len(rotary)} rotary "
                        "embeddings or per-layer rope parameters")
    if params.get("rope_type", "default") != "default":
        raise UserError(f"model.rope_scaling: this model already uses {params['rope_type']} RoPE scaling; "
                        "load it without model.rope_scaling")
    original = int(cfg.max_position_embeddings)
    cfg.rope_parameters = {**params, "rope_type": scaling.type, "factor": float(scaling.factor),
                           "original_max_position_embeddings": original}
    cfg.max_position_embeddings = int(round(original * scaling.factor))
    parent, attr, old = rotary[0]
    new = type(old)(config=cfg)
    setattr(parent, attr, new.to(old.inv_freq.device))


def rope_identity(model) -> dict | None:
    """The RoPE scaling a model runs with, as the fingerprint records it; None for native RoPE."""
    params = getattr(_text_config(model), "rope_parameters", None)
    if not isinstance(params, dict) or params.get("rope_type", "default") == "default":
        return None
    return {"type": params["rope_type"], "factor": float(params.get("factor") or 0.0),
            "original_window": params.get("original_max_position_embeddings")}
