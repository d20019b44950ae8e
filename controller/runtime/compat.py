"""What `attach` checks before it touches a model: that the model is the one the checkpoint was
trained for (structure, then weights by `id` or `weights_id`), that a named task is one the
controller knows, which break-even table applies on this card, and that the environment switches
of `sparse_kernels` hold valid values. Each failure is one UserError line. Imports `data` and
`sparse_kernels` only (ships at inference: nothing from training).
"""
from __future__ import annotations

import logging

import torch

from data.errors import UserError
from data.models import model_fingerprint, same_weights
from data.tasks.base import TASK_TYPES, UNKNOWN_TASK
from sparse_kernels.backends import switch_problem
from sparse_kernels.dispatch import BreakEven, recorded_break_even

from controller.runtime.checkpoint import ControllerCheckpoint

log = logging.getLogger(__name__)

STRUCTURE = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def check_switches() -> None:
    """UserError when an environment switch of `sparse_kernels` (`SWITCHES`) has a value it refuses."""
    problem = switch_problem()
    if problem is not None:
        raise UserError(problem)


def check_model(model, ckpt: ControllerCheckpoint, strict: bool = True) -> None:
    """UserError unless `model` is the model the checkpoint's labels were made with."""
    fp, recorded = model_fingerprint(model)
    want = ckpt.fingerprint
    diff = [k for k in STRUCTURE if fp.get(k) != want.get(k)]
    if diff:
        raise UserError(f"controller was trained for model {want.get('id')} ({', '.join(f'{k}={want.get(k)}' for k in diff)}), "
                        f"this model has {', '.join(f'{k}={fp.get(k)}' for k in diff)}; train a controller for this model")
    if same_weights(fp, want) or not (recorded or strict):
        return
    if want.get("weights_id") is not None:
        raise UserError(f"controller was trained for model {want['id']} (weights {want['weights_id']}), this model's "
                        f"weights are {fp['weights_id']}; train a controller for this model")
    how = "" if recorded else (" (this checkpoint predates weight ids: load the model with data.models.load_model so "
                               "its file fingerprint is known, retrain, or attach with strict=False)")
    raise UserError(f"controller was trained for model {want['id']}, this model's weights are {fp['id']}{how}")


def resolve_break_even(model, break_even: str | BreakEven | dict | None) -> BreakEven | None:
    """`auto`: on CUDA, the table the benchmark recorded for this model on this card; without one,
    every request runs dense (a warning says how to record one). Off CUDA no table is recorded and
    sparse prefill is slower than dense (a 6K-token prompt at level 0.95 took 2.4-2.7x the unhooked
    time on a 2-core CPU), so every request runs dense there too, with a warning; `break_even=None`
    runs the controller's decisions anyway (tests of the mechanics, studies)."""
    if break_even is None or isinstance(break_even, BreakEven):
        return break_even
    if isinstance(break_even, dict):
        return BreakEven.from_json({"levels": break_even, "source": "given to attach"})
    if break_even != "auto":
        raise UserError(f"break_even must be 'auto', None, a BreakEven or {{level: tokens}}, got {break_even!r}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.warning("the model is on %s, where sparse prefill is slower than dense and no break-even table is "
                    "recorded: every request runs dense. attach(..., break_even=None) runs the controller's "
                    "decisions anyway", device.type)
        return BreakEven((), f"no break-even table on {device.type}: sparse prefill runs slower than dense there")
    card, fp = torch.cuda.get_device_name(device), model_fingerprint(model)[0]
    model_id = fp["id"]
    table = recorded_break_even(fp, card)
    if table is None:
        log.warning("no break-even table for model %s on %s: every request runs dense. Record one with "
                    "`python -m controller.benchmark --checkpoint CKPT --out sparse_kernels/bench/CARD.json`, or "
                    "attach(..., break_even=None) to run sparse wherever the controller decides", model_id, card)
        table = BreakEven((), f"no break-even table for {card}")
    return table


def check_task(task) -> None:
    """UserError for a task that is not None, a known task type or a list of them (one per batch
    row); a name the controller does not know would silently count as `unknown`."""
    names = task if isinstance(task, (list, tuple)) else [task]
    bad = [t for t in names if t is not None and t not in (*TASK_TYPES, UNKNOWN_TASK)]
    if bad:
        raise UserError(f"task {bad[0]!r} is not one of {sorted(TASK_TYPES)}; pass one of them, a list of them "
                        f"(one per batch row), or None (or {UNKNOWN_TASK!r}) when the request type is unknown")
