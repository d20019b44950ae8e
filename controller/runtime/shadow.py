"""Shadow labels: a served request re-run dense off the request path, judged by the checkpoint's
label-free criterion, so the live violation rate of the deployed decisions can be bounded
(`controller.guarantee.risk.LiveRisk`).

Owns `shadow_measurements` (one request at one level: the dense greedy answer, then that answer
teacher forced after the dense prompt and after the prompt prefilled sparse at the level, as the
labeler measures a row, `data.labeling.divergence_from`) and `ShadowLabeler` (a worker thread that
labels the requests `LiveRisk` samples and reports each label to it). A request decided dense is a
label of its own (never a violation) and costs nothing. The worker's calls run with the handle
paused on its thread (no probe, no decision), so serving threads are not affected; they share the
GPU. Imports `sparse_kernels`, `data` and `controller` modules below it; nothing from training.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from data.criteria import within_bound
from data.errors import UserError
from data.decode import DecodeBatch, cache_kwarg, cache_of, greedy_tokens, teacher_logprobs
from data.labeling import divergence_from
from sparse_kernels import SparsePlan, use_plan

from controller.guarantee.risk import LiveRisk, ThresholdLadder

log = logging.getLogger(__name__)


def _stop_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _prefilled(model, x: torch.Tensor, plan: SparsePlan | None) -> DecodeBatch:
    """One request prefilled (under `plan`, or dense) as a batch of one row."""
    with use_plan(plan) if plan is not None else contextlib.nullcontext():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    return DecodeBatch.stack([cache_of(out)], [out.logits[:, -1]], [x.shape[1]])


@torch.no_grad()
def shadow_measurements(handle, ids: list[int], level: float, max_new: int = 32) -> dict:
    """The raw measurements of one request at `level` against dense (run with the handle paused)."""
    return shadow_measurements_at(handle, ids, [level], max_new)[level]


@torch.no_grad()
def shadow_measurements_at(handle, ids: list[int], levels: list[float], max_new: int = 32) -> dict[float, dict]:
    """The raw measurements of one request at each of `levels` against dense, with the handle paused:
    the labeler's own loops (`data.decode`) on a batch of one row, as its noise floor runs them. The
    dense answer is decoded once; each level costs one sparse prefill and one teacher-forced pass."""
    model = handle.model
    arg = cache_kwarg(model)
    forward = lambda cache, **inputs: model(use_cache=True, **{arg: cache}, **inputs)  # noqa: E731
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out = {}
    with handle.paused():
        dense = _prefilled(model, x, None)
        answer = greedy_tokens(forward, dense, [max_new], _stop_ids(model))[0]
        dense_logp, valid = teacher_logprobs(forward, dense, [answer])
        for level in sorted(set(levels)):
            plan = SparsePlan(levels=torch.tensor([level], dtype=torch.float64), selection=handle.selection,
                              dense_layers=handle.dense_layers, backend=handle.backend)
            sparse_logp, _ = teacher_logprobs(forward, _prefilled(model, x, plan), [answer])
            m = divergence_from(torch.cat([dense_logp, sparse_logp]), valid.expand(2, -1), [answer, answer], [0, 0])
            out[level] = {k: float(v[1]) for k, v in m.items()}
    return out


def violated(measured: dict, criterion: dict) -> bool:
    """Is this row unsafe under a divergence criterion with a recorded threshold?"""
    return not within_bound(measured[criterion["measure"]], criterion["measure"], criterion["threshold"])


class ShadowLabeler:
    """Labels the requests `risk` samples, on one worker thread, and reports them to `risk`."""

    def __init__(self, handle, risk: LiveRisk, max_new: int = 32):
        crit = handle.ckpt.record["criterion"]
        if crit.get("name") != "divergence" or crit.get("threshold") is None:
            raise ValueError("shadow labels need a checkpoint calibrated under the divergence criterion "
                             "(calibrate.py's default), which records its threshold")
        self.handle, self.risk, self.criterion, self.max_new = handle, risk, dict(crit), max_new
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-shadow")
        self.pending: list[Future] = []
        self._count = 0
        self.ladder = None   # a ThresholdLadder fed from the same shadow runs (certify_live(ladder=...))

    def offer(self, ids, level: float, rungs: list[float] | None = None) -> bool:
        """A served request (its prompt ids, or None for one dispatched dense before any decision, its
        level, and with a live ladder the level each rung would choose); True when it is sampled."""
        self._count += 1
        key = (hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest() if ids is not None
               else f"dense-{self._count}")
        if not self.risk.sampled(key):
            return False
        if level <= 0 and not any(r > 0 for r in rungs or ()):
            self.risk.observe(False)   # dense: safe by definition, no shadow run
            if rungs is not None and self.ladder is not None:
                self.ladder.observe([False] * len(rungs))
            return True
        self.pending.append(self._worker.submit(self._label, list(ids), float(level), rungs))
        return True

    def _label(self, ids: list[int], level: float, rungs: list[float] | None = None) -> None:
        try:
            wanted = [x for x in {level, *(rungs or ())} if x > 0]
            measured = shadow_measurements_at(self.handle, ids, wanted, self.max_new)
            unsafe = {x: violated(m, self.criterion) for x, m in measured.items()}
            self.risk.observe(unsafe.get(level, False))
            if rungs is not None and self.ladder is not None:
                self.ladder.observe([unsafe.get(x, False) for x in rungs])
        except Exception as e:  # noqa: BLE001 - a failed shadow run loses one label, never the request
            log.warning("shadow label failed (%s: %s)", type(e).__name__, e)

    def drain(self) -> None:
        """Wait for every submitted label (tests, shutdown)."""
        for f in self.pending:
            f.result()
        self.pending.clear()

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def certify_live(handle, p: float = 0.05, p_shift: float = 0.5, seed: int = 0, max_new: int = 32,
                 ladder=None) -> LiveRisk:
    """Turn on the live certificate of an attached controller: a seeded share `p` of the requests
    it serves is labeled dense in the shadow (`p_shift` of them once the shift monitor warns that
    the traffic changed), the violation rate of its decisions is bounded anytime-validly at the
    checkpoint's alpha and delta, and once the lower bound exceeds alpha every request runs dense.
    A shift alone no longer sends traffic dense: it only labels more. `ladder`: offsets below the
    calibrated score threshold, e.g. (0, 0.05, 0.1, 0.2); each sampled request is then also judged at
    the level every offset would choose, and the threshold moves to an offset only once its live
    violation rate is certified below alpha (`controller.guarantee.risk.ThresholdLadder`); the handle's
    `ladder` says where it stands. Returns the `LiveRisk`."""
    rec = handle.ckpt.record
    if not 0 < p <= 1 or not p <= p_shift <= 1:
        raise UserError(f"certify_live needs 0 < p <= p_shift <= 1, got p={p}, p_shift={p_shift}")
    risk = LiveRisk(rec["alpha"], rec["delta"], p, seed)
    try:
        shadow = ShadowLabeler(handle, risk, max_new)
    except ValueError as e:
        raise UserError(f"{e}; recalibrate it with calibrate.py on your prompts") from None
    risk.p_shift = float(p_shift)
    if ladder is not None:
        try:
            shadow.ladder = ThresholdLadder(ladder, rec["alpha"], rec["delta"])
        except ValueError as e:
            raise UserError(f"certify_live: {e}") from None
    handle.stream.live, handle.stream.shadow, handle.stream.ladder = risk, shadow, shadow.ladder
    return risk
