"""Dense decoding of several prefilled samples in one batch (labeling's decode phase).

Owns `DecodeBatch`: the KV caches of K samples (each already prefilled, one row per grid level)
left-padded to the longest prompt and stacked into one cache, with the padding mask and each
row's own positions, so that greedy decoding and teacher forcing run K samples per forward.
Decoding a 135M model is bound by kernel launches, not by arithmetic: K samples per step cost
about what one costs. With K = 1 nothing is padded and the forward calls equal the unbatched ones.
Also owns the two loops run over such a batch, given the model's forward (`greedy_tokens`,
`teacher_logprobs`: the labeler's and the shadow labeler's), and the cache plumbing across
transformers versions (`cache_kwarg`, `cache_of`).
Imports nothing from the project.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cache_kwarg(model) -> str:
    """The name `model.forward` takes a cache under (transformers renamed `past_key_values` to
    `cache` in 5.2x; both are accepted)."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The cache a forward returned (under `cache` or, before 5.2x, `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def crop_cache(cache, length: int) -> None:
    """Drop every cached token after the first `length` (negative `crop` works across versions)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def snapshot_cache(cache) -> list[tuple] | None:
    """The per-layer key/value tensors and lengths of a cache with per-layer tensors, else None.
    Dynamic layers replace their tensors on update (never write into them), so keeping references
    is enough to roll back; a sliding-window layer cannot be cropped once its window is full."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return None
    return [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in layers]


def restore_cache(cache, saved: list[tuple]) -> None:
    for layer, (keys, values, length) in zip(cache.layers, saved):
        layer.keys, layer.values = keys, values
        if length is not None:
            layer.cumulative_length = length


def cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise RuntimeError("batched decoding needs a transformers cache with per-layer keys/values "
                           "(transformers >= 4.56); set labeling.batch_samples=1")
    return list(layers)


def stack_caches(caches: list, width: int):
    """Left-pad every cache to `width` tokens and stack them along the batch; returns the first
    cache object holding the stacked tensors (the others are released)."""
    if len(caches) == 1:
        return caches[0]
    per_cache = [cache_layers(c) for c in caches]
    for i, layer in enumerate(per_cache[0]):
        sliding = getattr(layer, "is_sliding", False)
        for name in ("keys", "values"):
            parts = [getattr(layers[i], name) for layers in per_cache]
            if sliding:   # each holds its prompt's last window - 1 tokens: no padding, one frame of `width`
                if len({t.shape[-2] for t in parts}) != 1:
                    raise ValueError("sliding-window caches of prompts shorter than the window cannot be stacked; "
                                     "decode their samples one at a time")
                setattr(layer, name, torch.cat(parts, dim=0))
            else:
                setattr(layer, name, torch.cat([F.pad(t, (0, 0, width - t.shape[-2], 0)) for t in parts], dim=0))
        if sliding:
            layer.cumulative_length = width   # every row sits right-aligned in the padded frame
    return caches[0]


@dataclass
class DecodeBatch:
    """Rows of K samples over one stacked cache. `lengths[r]` is row r's prompt length; the
    cache holds `width` prompt positions per row, the first `width - lengths[r]` being padding."""
    cache: object
    first_logits: torch.Tensor   # [R, V] logits after each row's prompt
    lengths: torch.Tensor        # [R] long, on the model's device
    width: int
    saved: list[tuple] | None = None   # the prompt-only cache, restored by `reset` (None: crop instead)

    @classmethod
    def stack(cls, caches: list, firsts: list[torch.Tensor], lengths: list[int]) -> "DecodeBatch":
        rows = [f.shape[0] for f in firsts]
        width = max(lengths)
        per_row = torch.tensor([n for n, r in zip(lengths, rows) for _ in range(r)], device=firsts[0].device)
        cache = stack_caches(caches, width)
        return cls(cache, torch.cat(firsts), per_row, width, snapshot_cache(cache))

    @property
    def rows(self) -> int:
        return self.first_logits.shape[0]

    @property
    def padded(self) -> bool:
        return bool((self.lengths != self.width).any())

    def inputs(self, tokens: torch.Tensor, past: int) -> dict:
        """Forward arguments for `tokens` [R, T] placed after `past` already decoded tokens."""
        steps = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        positions = self.lengths[:, None] + steps
        if not self.padded:
            return {"input_ids": tokens, "position_ids": positions}
        pad = (self.width - self.lengths)[:, None]
        cols = torch.arange(self.width + past + tokens.shape[1], device=tokens.device)
        return {"input_ids": tokens, "position_ids": positions, "attention_mask": (cols >= pad).long()}

    def narrowed(self, rows: list[int]) -> "DecodeBatch":
        """These rows only, over the same cache object: its layers hold the rows' slices until
        `reset`, which restores the whole prompt cache (so the full batch is usable again after)."""
        if self.saved is None:
            raise RuntimeError("narrowing a batch needs a cache with per-layer tensors (transformers >= 4.56)")
        idx = torch.tensor(rows, device=self.first_logits.device)
        for layer, (keys, values, _) in zip(self.cache.layers, self.saved):
            layer.keys, layer.values = keys.index_select(0, idx), values.index_select(0, idx)
        return DecodeBatch(self.cache, self.first_logits[idx], self.lengths[idx], self.width, self.saved)

    def reset(self) -> None:
        """Back to the prompt-only cache after a decode or teacher-forcing pass."""
        if self.saved is not None:
            restore_cache(self.cache, self.saved)
        else:
            crop_cache(self.cache, self.width)


def pad_rows(rows: list[list[int]], fill: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into [R, T] with a validity mask (T >= 1)."""
    width = max(1, max(len(r) for r in rows))
    tokens = torch.full((len(rows), width), fill, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    return tokens.to(device), valid.to(device)


def greedy_tokens(forward, batch: DecodeBatch, max_new: list[int], stop_ids: set[int]) -> list[list[int]]:
    """Dense greedy decoding of every row until a stop token or its `max_new` tokens;
    `forward(cache, **inputs)` is one step of the model."""
    out: list[list[int]] = [[] for _ in range(batch.rows)]
    done = [False] * batch.rows
    tokens = batch.first_logits.argmax(-1)
    limit = max(max_new)
    for step in range(limit):
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                done[r] = t in stop_ids or len(out[r]) >= max_new[r]
                if not done[r]:
                    out[r].append(t)
        if all(done) or step == limit - 1:
            break
        tokens = forward(batch.cache, **batch.inputs(tokens[:, None], step)).logits[:, -1].argmax(-1)
    batch.reset()
    return out


def teacher_logprobs(forward, batch: DecodeBatch, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, T+1, V] float log-probs, [R, T+1] validity) of each row after its prompt and after each
    token of its answer (teacher forced, dense): the distributions that chose the answer's tokens
    and the one after its last token (where the answer stopped)."""
    tokens, valid = pad_rows(answers, 0, batch.first_logits.device)
    logp = [batch.first_logits.float().log_softmax(-1)[:, None]]
    if any(answers):
        logits = forward(batch.cache, **batch.inputs(tokens, 0)).logits.float()
        logp.append(logits.log_softmax(-1))
    batch.reset()
    width = tokens.shape[1] + 1 if any(answers) else 1
    ends = torch.tensor([len(a) for a in answers], device=valid.device)
    return torch.cat(logp, dim=1), torch.arange(width, device=valid.device)[None] <= ends[:, None]
