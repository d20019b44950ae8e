"""The inference hook: a trained controller picks the sparsity level of each request in a frozen
transformers model, inside plain `model(...)` and `model.generate(...)` calls.

Owns `attach(model, checkpoint)` -> `ControllerHandle` (`detach()` restores the model); each
request's `Decision` (`controller.decision`, importable from here too). Before anything else, a
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
its `Decision` says `ood=True` and why. The handle's `monitor` (`monitor.ShiftMonitor`) bets on the
stream of those p-values and tests every 100 requests' features against the calibration requests (on
its own worker thread): once the traffic as a whole stops looking exchangeable with the calibration
requests, every later request runs at the fallback and says so, until `handle.monitor.reset()` or a
recalibrated checkpoint; the first `guard.warmup` requests of a stream run at the fallback too
(probation), while the monitor watches them. With the live certificate on
(`controller.shadow.certify_live`), a seeded share of the requests is labeled dense in the shadow,
a monitor alarm only raises that share, and every request runs dense once the anytime-valid lower
bound of the live violation rate exceeds alpha. A row decided at a level whose sparse path is slower
than dense at this length runs dense and says so. Decode and cached continuations stay dense. Any
failure while deciding a row makes that row dense and is logged, never raised.
Imports `sparse_kernels`, `data` and `controller` modules below it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data.errors import UserError
from data.features import FEATURE_NAMES, ProbeCollector, compute_features, feature_vector, text_statistics
from data.models import LoadedModel
from sparse_kernels import (SelectionSpec, SparsePlan, disable_sparse_attention, enable_sparse_attention,
                            unsupported_reason, use_plan)
from sparse_kernels.dispatch import BreakEven

from .compat import check_model, check_switches, check_task, resolve_break_even
from .decision import Decision, one_thread_limiter
from .export import ControllerCheckpoint, load_checkpoint
from .policies import deployed_policy

log = logging.getLogger(__name__)
_ATTACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its attached handle
_ATTACH_LOCK = threading.Lock()   # attach and detach are atomic per process (so per model)


class ControllerHandle:
    def __init__(self, model, ckpt: ControllerCheckpoint, task: str | list[str] | None,
                 break_even: BreakEven | None = None):
        self.model, self.ckpt, self.task = model, ckpt, task
        self.break_even = break_even   # None: sparse wherever the controller decides (no speed table applies)
        # per thread: concurrent generate() calls on one model each get their own plan and decisions
        self._local = threading.local()
        # benchmarks: run this level, still probing and deciding (no length or break-even skip)
        self.force_level: float | None = None
        # False: probe and decide every fresh prefill (diagnostics, tests), without the skips before
        # the probes (length outside the calibrated range, shorter than any break-even)
        self.dispatch = True
        rec = ckpt.record["sparse"]
        self.selection = SelectionSpec(method=rec["method"], block_size=rec["block_size"], sink_blocks=rec["sink_blocks"],
                                       local_blocks=rec["local_blocks"], last_queries=rec["last_queries"])
        self.dense_layers, self.probe_layers = frozenset(rec["dense_layers"]), frozenset(rec["probe_layers"])
        self.probe_window, self.backend = rec["probe_window"], rec["backend"]
        self.policy = deployed_policy(ckpt.net, ckpt.levels, ckpt.record)
        self.calibration = ckpt.calibration   # parsed once, not per request
        self.guard = ckpt.guard   # None: a checkpoint without one (every request is decided by the controller)
        # the traffic as a whole: once its p-values stop looking exchangeable, every request runs at the fallback
        self.monitor = self.guard.monitor() if self.guard is not None else None
        # the live certificate (`controller.shadow.certify_live`): shadow labels, fallback on harm
        self.live, self.shadow, self.ladder = None, None, None   # ladder: the threshold moving with live labels
        self._previous, self._hooks = None, []   # set by _install, under the attach lock
        # the token-id statistics need only the ids: a worker computes them while the probe layers run
        self._text_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-features")
        self._monitor_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-monitor")
        self._one_thread = one_thread_limiter()

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

    @property
    def _active(self):
        """(context manager, plan, collector, rows, info, text futures) during this thread's prefill."""
        return getattr(self._local, "active", None)

    @_active.setter
    def _active(self, value) -> None:
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
        if self.shadow is not None:
            self.shadow.shutdown()
        self._text_worker.shutdown(wait=False, cancel_futures=True)
        self._monitor_worker.shutdown(wait=False, cancel_futures=True)

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

    def decide(self, features: np.ndarray, n_tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """features [B, F] -> (level index [B], P(safe) at it [B]) from one pass of the net; `n_tokens`
        [B] picks each row's length stratum (default: read from the `log_length` feature)."""
        idx, at, _ = self._decide(features, n_tokens)
        return idx, at

    def _decide(self, features, n_tokens=None, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`decide`, and P(safe) at every level [B, levels] (None for a mass-coverage policy); `offset`
        lowers the calibrated threshold (the live ladder's certified rung)."""
        features = np.asarray(features, dtype=np.float32)
        if n_tokens is None:
            n_tokens = np.rint(np.exp(features[:, FEATURE_NAMES.index("log_length")].astype(np.float64))).astype(np.int64)
        if not hasattr(self.policy, "probabilities"):   # mass coverage: report the estimated kept mass
            scores = self.policy.scores(features)
            idx = self.calibration.decide(scores, n_tokens)
            return idx, np.minimum(scores[np.arange(len(scores)), idx], 1.0), None
        p = self.policy.probabilities(features)
        idx = self.calibration.decide(self.policy.scores_from(p, features), n_tokens, offset)
        return idx, p[np.arange(len(p)), idx], p

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
        for _ in range(rows if self.shadow is not None else 0):
            self.shadow.offer(None, 0.0)   # served dense: in the live rate, a label that costs nothing
        self._record([Decision(0.0, 1.0, 0.0, w, ood) for w in whys], [None] * rows, seconds=0.0)

    def _window_call(self, rows: int, whys: list[str], ood: bool) -> None:
        """A request that runs dense, on a model whose sliding-window layers are faster over their
        window only from this length (measured: `BreakEven.window_from`): a plan at level 0 with no
        probe and no decision, so only those layers change path (the same attention)."""
        plan = SparsePlan(levels=torch.zeros(rows, dtype=torch.float64), selection=self.selection,
                          dense_layers=self.dense_layers, backend=self.backend)
        info = {r: (1.0, f"{w} (sliding-window layers over their window only)", ood, None) for r, w in enumerate(whys)}
        ctx = use_plan(plan)
        ctx.__enter__()
        self._active = (ctx, plan, ProbeCollector(), list(range(rows)), info, [])

    def _outside_lengths(self, lengths: list[int]) -> bool:
        """Every row outside the guard's calibrated lengths, with a dense fallback. A guard that cannot
        say is not skipped on: the decision path meets the failure and reports it per row."""
        g = self.guard
        try:
            return g is not None and g.fallback == 0 and all(not g.min_tokens <= t <= g.max_tokens for t in lengths)
        except Exception:  # noqa: BLE001 - a broken guard is reported where the rows are decided
            return False

    def _skip_reason(self, n: int, lengths: list[int]) -> tuple[list[str], bool] | None:
        """Why no row of this prefill needs probes or a decision (every row runs dense: with no plan,
        exactly as unhooked SDPA, or through `_window_call` where the window path was measured
        faster), or None."""
        if self.force_level is not None or not self.dispatch:
            return None
        if self._outside_lengths(lengths):
            g = self.guard
            return [f"length {t} tokens is outside the calibrated range {g.min_tokens}-{g.max_tokens}; ran dense"
                    for t in lengths], True
        if self.break_even is not None and n < self.break_even.shortest():
            shortest = self.break_even.shortest()
            where = f"below {shortest} tokens" if np.isfinite(shortest) else "at every measured length"
            return [f"sparse prefill is slower than dense {where} here ({n} tokens; {self.break_even.source}); "
                    "ran dense without a decision"] * len(lengths), False
        return None

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
        skip = self._skip_reason(ids.shape[1], lengths)
        if skip is not None and self.break_even is not None and self.break_even.runs_window(int(ids.shape[1])):
            self._window_call(ids.shape[0], *skip)
            return None
        if skip is not None:
            self._dense_call(ids.shape[0], *skip)
            return None
        rows = [ids[r][mask[r].bool()] if mask is not None else ids[r] for r in range(ids.shape[0])]
        collector = ProbeCollector()
        plan = SparsePlan(levels=None, selection=self.selection, dense_layers=self.dense_layers, backend=self.backend,
                          probe_layers=self.probe_layers, on_probe=lambda layer, stats: self._probe(layer, stats),
                          before_sparse=self._decide_pending,
                          probe_window=self.probe_window)
        rows = [r.cpu().numpy() for r in rows]
        text = [self._text_worker.submit(text_statistics, ids) for ids in rows]
        ctx = use_plan(plan)   # entered last: nothing after it can fail and leave the plan current
        ctx.__enter__()
        self._active = (ctx, plan, collector, rows, {"tokens": int(ids.shape[1])}, text)

    def _decide_row(self, r: int, ids: np.ndarray, pooled: dict, text_stats: dict, info: dict) -> float:
        """The level of one request: the calibrated decision, or the guard's fallback when the
        request is outside the calibrated support. Records what happened in `info`."""
        task = self._task_of(r, len(self._active[3]))
        feats = feature_vector(compute_features(ids, pooled, task, text_stats=text_stats))
        info[("features", r)] = feats
        if self.live is not None and self.live.harmful:   # fallback on harm: measured, not guessed
            info[r] = (1.0, self.live.reason(), False, None)
            return 0.0
        if self.guard is not None:
            flagged, p, reasons = self.guard.check(feats[None])
            alarmed, probation = self.monitor.step(float(p[0]))
            window = self.monitor.add_features(feats)
            if window is not None:   # the two-sample test runs on the worker thread, off the request path
                self._monitor_worker.submit(self.monitor.test_window, window)
            if alarmed and self.live is not None:   # with shadow labels a change is a warning: label more
                if not self.live.shift_warned:
                    log.warning("%s; shadow-labeling %.0f%% of requests from now on", self.monitor.reason(),
                                100 * self.live.p_shift)
                    self.live.warn_shift()
                alarmed = False
            if flagged[0] or alarmed:
                info[r] = (1.0, reasons[0] or self.monitor.reason(), True, float(p[0]))
                return self.guard.fallback
            if probation is not None:
                info[r] = (1.0, self.monitor.probation_reason(probation), False, float(p[0]))
                return self.guard.fallback
        offset = self.ladder.offset if self.ladder is not None else 0.0   # read once: the decision's and the record's
        idx, prob, p_all = self._decide(feats[None], np.array([len(ids)]), offset)
        info[r] = (float(prob[0]), None, False, None if self.guard is None else float(p[0]))
        base = self.calibration.threshold_at(len(ids))
        info[("detail", r)] = (None if p_all is None else tuple(float(x) for x in p_all[0]),
                               None if base is None else base - offset)   # the threshold that decided it
        info[("base", r)] = base
        return float(self.ckpt.levels[idx[0]])

    def _probe(self, layer: int, stats: dict) -> None:
        """A probe layer's statistics; after the last one, their copy to the host starts and the
        decision waits for the first sparse layer (`SparsePlan.before_sparse`), so the GPU runs the
        layers queued in between while the host decides. Where the last probe layer is itself sparse,
        the decision comes right after its probe and that layer already runs at the decided level."""
        collector = self._active[2]
        collector(layer, stats)
        if layer == max(self.probe_layers):
            collector.start_copy()

    def _decide_pending(self) -> None:
        """Every row's level, set on the plan (the plan's `before_sparse`, called inside the model's
        forward: nothing may escape, so any failure runs the whole call dense)."""
        plan, rows, info = self._active[1], self._active[3], self._active[4]
        try:
            self._decide_rows()
        except Exception as e:  # noqa: BLE001 - e.g. a level the plan refuses, thread pools not limited
            log.warning("controller failed (%s: %s); running this call dense", type(e).__name__, e)
            for r in range(len(rows)):
                info[r] = (1.0, f"{type(e).__name__}: {e}", False, None)
            plan.set_levels(torch.zeros(len(rows), dtype=torch.float64))

    def _decide_rows(self) -> None:
        ctx, plan, collector, rows, info, text = self._active
        start = time.perf_counter()
        levels = np.zeros(len(rows))
        with self._one_thread():
            for r, ids in enumerate(rows):
                try:
                    levels[r] = self._decide_row(r, ids, collector.pooled(r), text[r].result(), info)
                except Exception as e:  # noqa: BLE001 - a controller failure must never reach generate()
                    log.warning("controller failed on request %d (%s: %s); running it dense", r, type(e).__name__, e)
                    levels[r] = 0.0
                    info[r] = (1.0, f"{type(e).__name__}: {e}", False, None)
        if self.force_level is not None:
            levels[:] = self.force_level
        else:
            self._veto_slow_levels(levels, info)
        self._local.seconds = time.perf_counter() - start
        plan.set_levels(torch.from_numpy(levels))   # refused levels: `_decide_pending` runs the call dense

    def _veto_slow_levels(self, levels: np.ndarray, info: dict) -> None:
        """Rows decided at a level whose sparse path is slower than dense at this length run dense
        (always safe) and say why; the controller's P(safe) stays in the decision."""
        if self.break_even is None:
            return
        n = info["tokens"]
        for r, level in enumerate(levels):
            if level > 0 and not self.break_even.allows(float(level), n):
                prob, _, ood, p_value = info[r]
                info[r] = (prob, self.break_even.why_dense(float(level), n), ood, p_value)
                levels[r] = 0.0

    def _after(self, module, args, kwargs, output):
        if self._active is None:
            return None
        ctx, plan, collector, rows, info, _ = self._active
        if plan.levels is None and plan.before_sparse is not None and collector.layers:
            plan.before_sparse = None   # no sparse layer ran (every layer dense): decide for the record
            self._decide_pending()
        self._active = None
        ctx.__exit__(None, None, None)
        levels = plan.levels.tolist() if plan.levels is not None else [0.0] * len(rows)
        achieved = plan.counts.achieved_sparsity().tolist()
        decisions = []
        for r in range(len(rows)):
            prob, fallback, ood, p_value = info.get(r, (1.0, "no probe layer ran", False, None))
            p_safe, threshold = info.get(("detail", r), (None, None))
            decisions.append(Decision(float(levels[r]), prob, float(achieved[r]) if r < len(achieved) else 0.0,
                                      fallback, ood, p_value, p_safe, threshold))
        self._record(decisions, [info.get(("features", r)) for r in range(len(rows))])
        if self.shadow is not None:   # sampled requests are labeled dense on the shadow worker
            for r, d in enumerate(decisions):
                rungs = self._rungs(d, info.get(("base", r)), info.get(("features", r)))
                self.shadow.offer(rows[r] if isinstance(rows[r], np.ndarray) else None, d.level, rungs)
        return None


    def _rungs(self, d: Decision, base: float | None, features) -> list[float] | None:
        """The level each rung of the live ladder would choose for this decision: the scores the policy
        decided with, against the calibrated threshold `base` (None: no ladder, or a request the
        calibrated rule did not decide)."""
        if self.ladder is None or d.p_safe is None or base is None or d.fallback is not None:
            return None
        scores = self.policy.scores_from(np.asarray([d.p_safe]), np.asarray(features, np.float32)[None])[0]
        return [float(self.ckpt.levels[i]) for i in self.ladder.levels(scores, base)]


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
