"""The inference hook: a trained controller picks the sparsity level of each request in a frozen
transformers model, inside plain `model(...)` and `model.generate(...)` calls.

Owns `attach(model, checkpoint)` -> `ControllerHandle` (`detach()` restores the model); each
request's `Decision` (`controller.runtime.decision`, importable from here too). Before anything else, a
fresh prefill that cannot gain is dispatched dense with no plan at all (it then runs exactly as
unhooked SDPA: no probe, no decision, no host sync): every row outside the calibrated lengths (dense
fallback), or the prompt shorter than the break-even length that the benchmark measured for this
model on this card (`sparse_kernels.dispatch`); on a model with sliding-window layers, from the
measured `window_from`, such a prefill gets a plan at level 0 instead (those layers over their
window only, still no probe and no decision). Otherwise a forward pre-hook makes a `SparsePlan`
current with no levels yet, and a worker thread starts the token-id statistics; the dense probe
layers run and call back; after the last probe layer the handle computes each row's features with
`data.features.compute_features` (THE extractor labeling used), asks the net for P(safe), applies
the calibrated threshold and sets the row levels, so the later (sparse) layers of the same forward
run at those levels. A request outside the checkpoint's calibrated support (its `ShiftGuard`: length
range, conformal p-value of its features) runs at the guard's fallback level (dense by default) and
its `Decision` says `ood=True` and why. The handle's `monitor` (`guarantee.monitor.ShiftMonitor`) bets on the
stream of those p-values and tests every 100 requests' features against the calibration requests (on
its own worker thread): once the traffic as a whole stops looking exchangeable with the calibration
requests, every later request runs at the fallback and says so, until `handle.monitor.reset()` or a
recalibrated checkpoint; the first `guard.warmup` requests of a stream run at the fallback too
(probation), while the monitor watches them. With the live certificate on
(`controller.runtime.shadow.certify_live`), a seeded share of the requests is labeled dense in the shadow,
a monitor alarm only raises that share, and every request runs dense once the anytime-valid lower
bound of the live violation rate exceeds alpha. A row decided at a level whose sparse path is slower
than dense at this length runs dense and says so. Decode and cached continuations stay dense. Any
failure while deciding a row makes that row dense and is logged, never raised.
The handle is made of four parts, each owning one thing: the plan (`plans.PlanMaker`), the probes
(`probes.Probes`), the decision (`deciding.Decider`) and the stream state (`stream.StreamState`);
the handle keeps the per-thread prefill and the model's forward hooks. Imports `sparse_kernels`,
`data` and `controller.runtime` modules below it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from data.errors import UserError
from data.features import ProbeCollector
from data.models import LoadedModel
from sparse_kernels import disable_sparse_attention, enable_sparse_attention, unsupported_reason, use_plan
from sparse_kernels.dispatch import BreakEven

from controller.runtime.checkpoint import ControllerCheckpoint, load_checkpoint
from controller.runtime.compat import check_model, check_switches, check_task, resolve_break_even
from controller.runtime.deciding import Decider
from controller.runtime.decision import Decision
from controller.runtime.plans import PlanMaker
from controller.runtime.probes import Prefill, Probes
from controller.runtime.stream import StreamState

log = logging.getLogger(__name__)
_ATTACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its attached handle
_ATTACH_LOCK = threading.Lock()   # attach and detach are atomic per process (so per model)


def _part(part: str, name: str, doc: str) -> property:
    """A handle attribute that lives in one of its parts (read and set through the handle)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class ControllerHandle:
    # the plan: what each fresh prefill runs under
    selection = _part("plans", "selection", "the checkpoint's block selection (`SelectionSpec`)")
    dense_layers = _part("plans", "dense_layers", "layers that always run dense")
    probe_layers = _part("plans", "probe_layers", "dense layers whose attention statistics are the probes")
    probe_window = _part("plans", "probe_window", "query rows the probes look at")
    backend = _part("plans", "backend", "the sparse attention backend")
    # the decision
    policy = _part("decider", "policy", "the deployed policy (`controller.runtime.policy`)")
    calibration = _part("decider", "calibration", "the calibrated threshold (`Calibration`)")
    guard = _part("decider", "guard", "the shift guard (None: every request is decided by the controller)")
    break_even = _part("decider", "break_even", "from which length each level is worth running (None: everywhere)")
    force_level = _part("decider", "force_level", "benchmarks: run this level, still probing and deciding")
    dispatch = _part("decider", "dispatch", "False: probe and decide every fresh prefill (no skip before the probes)")
    # the stream
    monitor = _part("stream", "monitor", "the stream's shift monitor (None without a guard)")
    live = _part("stream", "live", "the live risk bound (`certify_live`; None while off)")
    shadow = _part("stream", "shadow", "the shadow labeler (`certify_live`; None while off)")
    ladder = _part("stream", "ladder", "the threshold ladder moving with live labels (None: fixed threshold)")

    def __init__(self, model, ckpt: ControllerCheckpoint, task: str | list[str] | None,
                 break_even: BreakEven | None = None):
        self.model, self.ckpt, self.task = model, ckpt, task
        self.plans = PlanMaker(ckpt.record["sparse"])
        self.probes = Probes(self.plans)
        self.decider = Decider(ckpt, break_even)
        self.stream = StreamState(self.decider.guard)
        # per thread: concurrent generate() calls on one model each get their own plan and decisions
        self._local = threading.local()
        self._previous, self._hooks = None, []   # set by _install, under the attach lock

    # ---------------------------------------------------------------- public
    @property
    def last_decisions(self) -> list[Decision]:
        """This thread's decisions of its last fresh prefill (one per row)."""
        return getattr(self._local, "decisions", [])

    @property
    def last_features(self) -> list[np.ndarray | None]:
        """This thread's feature vectors of its last prefill, per row, as decided on."""
        return getattr(self._local, "features", [])

    @property
    def last_decision_seconds(self) -> float:
        """Features + controller for this thread's last prefill (all rows)."""
        return getattr(self._local, "seconds", 0.0)

    def decide(self, features: np.ndarray, n_tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """features [B, F] -> (level index [B], P(safe) at it [B]) from one pass of the net; `n_tokens`
        [B] picks each row's length stratum (default: read from the `log_length` feature)."""
        idx, at, _ = self.decider.decide(features, n_tokens)
        return idx, at

    @property
    def _active(self) -> Prefill | None:
        """This thread's prefill in flight."""
        return getattr(self._local, "active", None)

    @_active.setter
    def _active(self, value: Prefill | None) -> None:
        self._local.active = value

    def _record(self, decisions: list[Decision], features: list, seconds: float | None = None) -> None:
        self._local.decisions, self._local.features = decisions, features
        if seconds is not None:
            self._local.seconds = seconds

    def _install(self) -> None:
        """The sparse adapter and the two forward hooks (attach calls it under `_ATTACH_LOCK`)."""
        self._previous = enable_sparse_attention(self.model)
        self._hooks = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                       self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def _shutdown_workers(self) -> None:
        self.stream.shutdown()
        self.probes.shutdown()

    def detach(self) -> None:
        """Restore the model (idempotent: a second call does nothing; safe from any thread)."""
        with _ATTACH_LOCK:
            if _ATTACHED.get(self.model) is not self:
                return
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._shutdown_workers()
            disable_sparse_attention(self.model, self._previous)
            del _ATTACHED[self.model]

    @contextlib.contextmanager
    def paused(self):
        """Inside the block this thread's calls skip the controller (no probe, no decision) but keep
        the sparse adapter, so a plan the caller sets (`sparse_kernels.use_plan`) runs as given
        (benchmarks: a level forced with no decision, call by call against the hooked path)."""
        self._local.paused = True
        try:
            yield self
        finally:
            self._local.paused = False

    @contextlib.contextmanager
    def detached(self):
        """Inside the block the model runs as if no controller were attached: its own attention
        implementation, hooks paused (benchmarks: the unhooked baseline in the same process). It
        switches the model for every thread: not for use while other threads serve requests."""
        with self.paused():
            disable_sparse_attention(self.model, self._previous)
            try:
                yield self
            finally:
                enable_sparse_attention(self.model)

    def __enter__(self) -> "ControllerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---------------------------------------------------------------- hooks
    def _task_of(self, row: int, rows: int) -> str | None:
        """The task of batch row `row` of `rows`: one name for every row, or one per row (a list of
        one is broadcast, e.g. over beams); a list of another length runs every row dense."""
        if not isinstance(self.task, (list, tuple)):
            return self.task
        if len(self.task) == 1:
            return self.task[0]
        if len(self.task) != rows:
            raise ValueError(f"task list names {len(self.task)} rows, the batch has {rows}; pass one task per row")
        return self.task[row]

    def _before(self, module, args, kwargs):
        if getattr(self._local, "paused", False):
            return None
        try:
            self._start_prefill(args, kwargs)
        except Exception as e:  # noqa: BLE001 - the hook never raises into the caller: this call runs dense
            log.warning("controller could not start (%s: %s); running this call dense", type(e).__name__, e)
            self._active = None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                self._dense_call(ids.shape[0], f"controller could not start ({type(e).__name__}: {e}); ran dense")
        return None

    def _dense_call(self, rows: int, why: str | list[str], ood: bool = False) -> None:
        whys = why if isinstance(why, list) else [why] * rows
        self.stream.served_dense(rows)
        self._record([Decision(0.0, 1.0, 0.0, w, ood) for w in whys], [None] * rows, seconds=0.0)

    def _window_call(self, rows: int, whys: list[str], ood: bool) -> None:
        """A request that runs dense, on a model whose sliding-window layers are faster over their
        window only from this length (measured: `BreakEven.window_from`): a plan at level 0 with no
        probe and no decision, so only those layers change path (the same attention)."""
        plan = self.plans.window_only(rows)
        info = {r: (1.0, f"{w} (sliding-window layers over their window only)", ood, None) for r, w in enumerate(whys)}
        ctx = use_plan(plan)
        ctx.__enter__()
        self._active = Prefill(ctx, plan, ProbeCollector(), list(range(rows)), info)

    def _uncached_step(self, ids: torch.Tensor, kwargs) -> bool:
        """A `use_cache=False` call whose ids extend this thread's last prefill's ids by new tokens."""
        last = getattr(self._local, "last_ids", None)
        if kwargs.get("use_cache") is not False or last is None or last.device != ids.device:
            return False
        return (last.shape[0] == ids.shape[0] and ids.shape[1] > last.shape[1]
                and torch.equal(ids[:, :last.shape[1]], last))

    def _start_prefill(self, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        fresh = cache is None or cache.get_seq_length() == 0
        if not fresh:
            return None   # decoding or a cached continuation: dense, and the prefill's decisions stay
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and embeds.dim() == 3 and embeds.shape[1] > 1:
                self._dense_call(embeds.shape[0], "inputs_embeds without input_ids: no token features; ran dense")
            return None
        if ids.dim() != 2 or ids.shape[1] < 2:
            return None
        if self._uncached_step(ids, kwargs):
            return None   # generate(use_cache=False) re-feeds the growing sequence: a continuation, dense
        self._local.last_ids = ids
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            self._dense_call(ids.shape[0], f"{mask.dim()}-D attention mask: rows cannot be told apart; ran dense")
            return None
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        skip = self.decider.skip_reason(ids.shape[1], lengths)
        if skip is not None and self.break_even is not None and self.break_even.runs_window(int(ids.shape[1])):
            self._window_call(ids.shape[0], *skip)
            return None
        if skip is not None:
            self._dense_call(ids.shape[0], *skip)
            return None
        rows = [ids[r][mask[r].bool()] if mask is not None else ids[r] for r in range(ids.shape[0])]
        collector = ProbeCollector()
        plan = self.plans.probing(on_probe=lambda layer, stats: self.probes.on_probe(collector, layer, stats),
                                  before_sparse=self._decide_pending)
        rows = [r.cpu().numpy() for r in rows]
        text = self.probes.start(rows)
        ctx = use_plan(plan)   # entered last: nothing after it can fail and leave the plan current
        ctx.__enter__()
        self._active = Prefill(ctx, plan, collector, rows, {}, text, int(ids.shape[1]))

    def _decide_pending(self) -> None:
        """Every row's level, set on the plan (the plan's `before_sparse`, called inside the model's
        forward: nothing may escape, so any failure runs the whole call dense)."""
        active = self._active
        try:
            self._decide_rows(active)
        except Exception as e:  # noqa: BLE001 - e.g. a level the plan refuses, thread pools not limited
            log.warning("controller failed (%s: %s); running this call dense", type(e).__name__, e)
            for r in range(len(active.rows)):
                active.info[r] = (1.0, f"{type(e).__name__}: {e}", False, None)
            active.plan.set_levels(torch.zeros(len(active.rows), dtype=torch.float64))

    def _decide_rows(self, active: Prefill) -> None:
        start = time.perf_counter()
        levels = np.zeros(len(active.rows))
        with self.decider.one_thread():
            for r, ids in enumerate(active.rows):
                try:
                    feats = self.probes.features(active, r, self._task_of(r, len(active.rows)))
                    levels[r] = self.decider.decide_row(r, feats, len(ids), self.stream, active.info)
                except Exception as e:  # noqa: BLE001 - a controller failure must never reach generate()
                    log.warning("controller failed on request %d (%s: %s); running it dense", r, type(e).__name__, e)
                    levels[r] = 0.0
                    active.info[r] = (1.0, f"{type(e).__name__}: {e}", False, None)
        if self.force_level is not None:
            levels[:] = self.force_level
        else:
            self.decider.veto_slow_levels(levels, active.info, active.tokens)
        self._local.seconds = time.perf_counter() - start
        active.plan.set_levels(torch.from_numpy(levels))   # refused levels: `_decide_pending` runs the call dense

    def _after(self, module, args, kwargs, output):
        active = self._active
        if active is None:
            return None
        plan, info = active.plan, active.info
        if plan.levels is None and plan.before_sparse is not None and active.collector.layers:
            plan.before_sparse = None   # no sparse layer ran (every layer dense): decide for the record
            self._decide_pending()
        self._active = None
        active.ctx.__exit__(None, None, None)
        levels = plan.levels.tolist() if plan.levels is not None else [0.0] * len(active.rows)
        achieved = plan.counts.achieved_sparsity().tolist()
        decisions = []
        for r in range(len(active.rows)):
            prob, fallback, ood, p_value = info.get(r, (1.0, "no probe layer ran", False, None))
            p_safe, threshold = info.get(("detail", r), (None, None))
            decisions.append(Decision(float(levels[r]), prob, float(achieved[r]) if r < len(achieved) else 0.0,
                                      fallback, ood, p_value, p_safe, threshold))
        self._record(decisions, [info.get(("features", r)) for r in range(len(active.rows))])
        if self.shadow is not None:   # sampled requests are labeled dense on the shadow worker
            for r, d in enumerate(decisions):
                rungs = self.decider.rungs(d, info.get(("base", r)), info.get(("features", r)), self.ladder)
                self.stream.served(active.rows[r], d.level, rungs)
        return None


def attach(model, checkpoint: str | Path | ControllerCheckpoint, task: str | list[str] | None = None,
           strict: bool = True, break_even: str | BreakEven | dict | None = "auto",
           warmup: int | None = None) -> ControllerHandle:
    """Attach a controller to a frozen transformers model (or a `LoadedModel`); returns the handle.
    `task` names the request type when the caller knows it (else the controller assumes `unknown`).
    `break_even` (see `resolve_break_even`): from which length each level is worth running here;
    shorter requests run dense with no probe and no decision, exactly as unhooked SDPA.
    `warmup`: how many first requests of the stream run at the fallback while the stream monitor
    watches the traffic (default: the checkpoint's `calibration.guard_warmup`; 0: none)."""
    if isinstance(model, LoadedModel):
        model = model.model
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise UserError(f"warmup must be a whole number of requests >= 0, got {warmup!r}")
    check_task(task)
    check_switches()
    ckpt = checkpoint if isinstance(checkpoint, ControllerCheckpoint) else load_checkpoint(checkpoint)
    check_model(model, ckpt, strict)
    reason = unsupported_reason(model)
    if reason is not None:
        raise UserError(reason)
    handle = ControllerHandle(model, ckpt, task, resolve_break_even(model, break_even))
    if warmup is not None and handle.monitor is not None:
        handle.monitor.warmup = warmup
    with _ATTACH_LOCK:   # check and install as one step: of concurrent attaches to one model, one wins
        if model in _ATTACHED:
            handle._shutdown_workers()
            raise UserError("this model already has a controller attached; detach it first (handle.detach())")
        handle._install()
        _ATTACHED[model] = handle
    return handle
