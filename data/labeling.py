"""Labeling: run the frozen model at every grid level on every sample and store raw measurements.

Owns `plan_samples` / `build_samples` (generators and RULER files from a DataConfig), `Labeler` (one sample ->
one batch whose rows are the grid levels: sparse prefill with per-row levels, then dense
teacher forcing of the reference answer, dense greedy decoding, and dense teacher forcing of the
dense model's answer) and `run_labeling` (resumable, shard by shard, with a progress bar).
Features come from the probe layers of the same prefill through `features.compute_features`.
Imports `sparse_kernels` and lower `data` modules; never `controller`.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparse_kernels import SparsePlan, enable_sparse_attention, resolve_backend, sliding_window_of, use_plan

from .config import DataConfig, LabelJobConfig, data_identity
from .decode import DecodeBatch, cache_kwarg, cache_of, greedy_tokens, pad_rows, teacher_logprobs
from .features import FEATURE_NAMES, FEATURE_VERSION, ProbeCollector, compute_features
from .models import LoadedModel
from .errors import UserError
from .tasks import Sample, TaskSpec, build_task, generate_sample, prompt_ids, read_prompts, read_ruler, score
from .tasks.base import generated_sample_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedSample:
    """A generated sample not yet generated: its id is known, its text is made on demand."""
    sample_id: str
    task: TaskSpec
    length: int
    index: int
    seed: int
    chat_template: bool
    form_set: str = "classic"

    def realize(self, tokenizer) -> Sample:
        return generate_sample(self.task.name, build_task(self.task), tokenizer, self.length, self.index,
                               self.seed, self.chat_template, self.form_set)


def plan_samples(cfg: DataConfig) -> list[PlannedSample | Sample]:
    """Every sample of the config in a deterministic order: generated ones as plans (index x tasks
    x lengths x form sets, so any prefix covers every task, length and form set), then RULER samples
    (read eagerly, so a malformed file fails before anything runs)."""
    plan: list[PlannedSample | Sample] = [
        PlannedSample(generated_sample_id(spec.name, length, i, cfg.seed, forms), spec, length, i, cfg.seed,
                      cfg.chat_template, forms)
        for i in range(cfg.samples_per_length) for spec in cfg.tasks for length in cfg.lengths for forms in cfg.forms]
    for path in cfg.ruler:
        plan += read_ruler(path)
    plan += choose_prompts([s for path in cfg.prompts for s in read_prompts(path)], cfg.max_prompts, cfg.seed)
    ids = [p.sample_id for p in plan]
    if len(set(ids)) != len(ids):
        raise UserError("duplicate sample ids: list each task once per config")
    return plan


def choose_prompts(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """`limit` of the prompts, chosen by a seeded hash of their ids (not file order), in file order."""
    if limit is None or limit >= len(samples):
        return samples
    rank = sorted(range(len(samples)), key=lambda i: hashlib.sha256(f"{seed}:{samples[i].sample_id}".encode()).digest())
    keep = set(rank[:limit])
    return [s for i, s in enumerate(samples) if i in keep]


def realize(item: PlannedSample | Sample, tokenizer) -> Sample:
    return item.realize(tokenizer) if isinstance(item, PlannedSample) else item


def build_samples(cfg: DataConfig, tokenizer) -> list[Sample]:
    """Every sample of the config, generated now (the runner generates lazily instead)."""
    return [realize(p, tokenizer) for p in plan_samples(cfg)]


_OOM_WORDS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    """Did this fail for want of memory? torch's own OOM error, or one that a Triton kernel launch,
    cuBLAS or cuDNN raises as a plain RuntimeError (they bypass torch's allocator)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(w in str(e) for w in _OOM_WORDS)


def gold_answer(sample: Sample) -> str:
    """The reference answer as the model should continue after the answer prefix."""
    text = sample.outputs[0] if sample.metric == "part" else ", ".join(sample.outputs)
    return " " + text


def stop_token_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    gen = getattr(lm.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {i for i in ids if i is not None}


class PhaseClock:
    """Wall seconds per phase of one sample (synchronising the GPU at each lap)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.t = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now


@dataclass
class Prefilled:
    """One sample after its sparse prefill: its cache and last logits, one row per level."""
    sample: Sample
    ids: list[int]
    plan: SparsePlan
    features: dict
    cache: object
    first: torch.Tensor
    seconds: float


class Labeler:
    def __init__(self, lm: LoadedModel, job: LabelJobConfig):
        self.lm, self.job = lm, job
        self.levels = torch.tensor(job.labeling.levels, dtype=torch.float64)
        self.stop_ids = stop_token_ids(lm)
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
        self.cache_arg = cache_kwarg(lm.model)
        enable_sparse_attention(lm.model)
        self.sliding = sliding_window_of(lm.model)   # None, or the window its sliding caches keep
        self.batch_limit = job.labeling.batch_samples   # halved when a batch runs out of memory

    def plan(self, collector: ProbeCollector) -> SparsePlan:
        sp = self.job.sparse
        return SparsePlan(levels=self.levels, selection=sp.selection(), dense_layers=frozenset(sp.dense_layers),
                          backend=sp.backend, probe_layers=frozenset(sp.probe_layers), on_probe=collector,
                          probe_window=sp.probe_window)

    def _forward(self, cache, **inputs):
        return self.lm.model(use_cache=True, **{self.cache_arg: cache}, **inputs)

    def answer_nll(self, batch: DecodeBatch, answers: list[list[int]]) -> torch.Tensor:
        """[R] mean NLL per token of each row's answer after its prompt (dense, teacher forced);
        NaN for an empty answer."""
        tokens, valid = pad_rows(answers, 0, batch.first_logits.device)
        logp = batch.first_logits.float().log_softmax(-1).gather(-1, tokens[:, :1])
        if tokens.shape[1] > 1:
            logits = self._forward(batch.cache, **batch.inputs(tokens[:, :-1], 0)).logits.float()
            logp = torch.cat([logp, logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]], dim=1)
        batch.reset()
        return (-(logp * valid).sum(1) / valid.sum(1)).cpu()

    def answer_logprobs(self, batch: DecodeBatch, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return teacher_logprobs(self._forward, batch, answers)

    def null_chosen(self, sample: Sample) -> bool:
        """Is this sample in the seeded share `labeling.null_share` that gets a dense reference alone?"""
        share = self.job.labeling.null_share
        digest = hashlib.sha256(f"null:{sample.sample_id}".encode()).digest()
        return share > 0 and int.from_bytes(digest[:8], "big") < share * 2**64

    def null_measurements(self, p: Prefilled, stacked_answer: list[int], stacked_logp: torch.Tensor) -> dict:
        """The noise floor of one sample: its dense row computed alone (no plan: plain SDPA, one row,
        decoded alone, as a request served dense by itself) against its dense row in the labeler's
        stacked batch. Every raw measurement, with the stacked dense row as the reference, as a
        sparse row is measured; with `labeling.null_answers`, also whether the alone greedy answer
        equals the batch's and its score (the fidelity and gold nulls: an unbatched decode, most of
        the floor's cost; the divergence criterion needs only the teacher-forced measurements)."""
        ids = torch.tensor([p.ids], device=self.lm.device)
        out = self._forward(None, input_ids=ids, logits_to_keep=1)
        alone = DecodeBatch.stack([cache_of(out)], [out.logits[:, -1]], [len(p.ids)])
        own = self.greedy(alone, [p.sample.max_new_tokens])[0] if self.job.labeling.null_answers else None
        logp, valid = self.answer_logprobs(alone, [stacked_answer])
        both = torch.stack([stacked_logp[:logp.shape[1]], logp[0]])
        m = divergence_from(both, valid.expand(2, -1), [stacked_answer] * 2, [0, 0])
        measured = {**{k: float(m[k][1]) for k in DIVERGENCE_COLUMNS}, "nll_rise": float(m["nll"][1] - m["nll"][0])}
        if own is None:
            return measured
        text = self.lm.tokenizer.decode(own, skip_special_tokens=True)
        return {**measured, "same_answer": float(own == stacked_answer),
                "score": score(p.sample.metric, text, p.sample.outputs) if p.sample.outputs else float("nan")}

    def greedy(self, batch: DecodeBatch, max_new: list[int]) -> list[list[int]]:
        return greedy_tokens(self._forward, batch, max_new, self.stop_ids)

    def prefill(self, sample: Sample) -> Prefilled:
        """Sparse prefill of one sample, one row per grid level; features from its probe layers."""
        ids = prompt_ids(self.lm.tokenizer, sample, self.job.data.chat_template)   # the sample's own setting wins
        collector = ProbeCollector()
        plan = self.plan(collector)
        clock = PhaseClock(self.lm.device)
        with use_plan(plan):
            tokens = torch.tensor([ids], device=self.lm.device).expand(len(self.levels), -1)
            out = self._forward(None, input_ids=tokens, logits_to_keep=1)
        features = compute_features(ids, collector.pooled(0), sample.task)
        clock.lap("prefill")
        return Prefilled(sample, ids, plan, features, cache_of(out), out.logits[:, -1], clock.seconds["prefill"])

    @torch.no_grad()
    def label_sample(self, sample: Sample) -> list[dict]:
        return self.label_samples([sample])

    @torch.no_grad()
    def label_samples(self, samples: list[Sample]) -> list[dict]:
        """Label K samples: K sparse prefills, then one stacked dense decode of all K x levels rows.
        Decode and teacher seconds are the batch's, divided evenly among its samples. A batch that
        runs out of memory is labeled again in halves (and later batches in parts no larger than the
        half that fitted); one sample that does not fit alone is a UserError naming it."""
        if len(samples) > self.batch_limit:
            k = self.batch_limit
            return [r for i in range(0, len(samples), k) for r in self.label_samples(samples[i:i + k])]
        try:
            pre = [self.prefill(s) for s in samples]
            return [r for group in self._decode_groups(pre) for r in self._decode(group)]
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            reason = type(e).__name__
        pre = None
        free_memory(self.lm.device)
        if len(samples) == 1:
            raise UserError(f"labeling request {samples[0].sample_id} alone at {len(self.levels)} levels ran out of "
                            f"{self.lm.device.type} memory ({reason}); drop or shorten that prompt, label fewer "
                            "levels, or use a device with more memory (the rows labeled so far are kept)")
        self.batch_limit = len(samples) // 2
        log.warning("labeling %d samples at once ran out of memory; continuing with batches of %d (set "
                    "labeling.batch_samples / --batch-samples %d to skip this retry)", len(samples), self.batch_limit,
                    self.batch_limit)
        return self.label_samples(samples)

    def _decode_groups(self, pre: list[Prefilled]) -> list[list[Prefilled]]:
        """Samples decoded together. A sliding-window cache keeps its prompt's last window - 1
        tokens: prompts at least that long stack (no padding there); shorter ones decode alone."""
        if self.sliding is None or len(pre) == 1:
            return [pre]
        full = [p for p in pre if len(p.ids) >= self.sliding - 1]
        return ([full] if full else []) + [[p] for p in pre if len(p.ids) < self.sliding - 1]

    def _decode(self, pre: list[Prefilled]) -> list[dict]:
        """One stacked dense decode of the K x levels rows of `pre`: greedy answers, gold and dense-answer NLLs."""
        batch = DecodeBatch.stack([p.cache for p in pre], [p.first for p in pre], [len(p.ids) for p in pre])
        for p in pre:
            p.cache = None  # the stacked cache holds every row now
        levels = len(self.levels)
        clock = PhaseClock(self.lm.device)
        gold = [self.lm.tokenizer(gold_answer(p.sample), add_special_tokens=False)["input_ids"] if p.sample.outputs
                else [] for p in pre]   # no reference answer: nll_gold is NaN
        nll_gold = self.answer_nll(batch, [g for g in gold for _ in range(levels)])
        answers = self._answers(batch, pre)
        clock.lap("decode")
        dense_answers = [answers[i * levels] for i in range(len(pre)) for _ in range(levels)]
        logp, valid = self.answer_logprobs(batch, dense_answers)
        measured = divergence_from(logp, valid, dense_answers, [i * levels for i in range(len(pre)) for _ in range(levels)])
        clock.lap("teacher")
        nulls = [self.null_measurements(p, answers[i * levels], logp[i * levels]) if self.null_chosen(p.sample) else {}
                 for i, p in enumerate(pre)]
        clock.lap("null")
        shared = {k: v / len(pre) for k, v in clock.seconds.items()}
        records = []
        for i, p in enumerate(pre):
            rows = slice(i * levels, (i + 1) * levels)
            records += self._records(p, answers[rows], nll_gold[rows], {k: v[rows] for k, v in measured.items()},
                                     nulls[i], {"prefill": p.seconds, **shared})
        return records

    def _answers(self, batch: DecodeBatch, pre: list[Prefilled]) -> list[list[int] | None]:
        """Every row's greedy answer; with `labeling.sparse_answers: false` the dense rows' only (None
        for the others): the divergence measurements need nothing else, and decoding 1 row per
        sample instead of one per level is most of labeling's time at long lengths."""
        levels = len(self.levels)
        if self.job.labeling.sparse_answers:
            return self.greedy(batch, [p.sample.max_new_tokens for p in pre for _ in range(levels)])
        dense = self.greedy(batch.narrowed([i * levels for i in range(len(pre))]), [p.sample.max_new_tokens for p in pre])
        return [dense[i] if r == 0 else None for i in range(len(pre)) for r in range(levels)]

    def _records(self, p: Prefilled, answers, nll_gold, measured: dict, null: dict, seconds) -> list[dict]:
        sample, ids, features, c = p.sample, p.ids, p.features, p.plan.counts
        achieved = c.achieved_sparsity()
        records = []
        for r, level in enumerate(self.levels.tolist()):
            text = None if answers[r] is None else self.lm.tokenizer.decode(answers[r], skip_special_tokens=True)
            records.append({
                "sample_id": sample.sample_id, "task": sample.task, "group": sample.group,
                "source": sample.source, "form": sample.form, "target_length": sample.target_length or len(ids), "n_tokens": len(ids),
                "level": level, "achieved_sparsity": float(achieved[r]),
                "kept_blocks_sparse": float(c.kept_sparse[r]) if c.kept_sparse is not None else 0.0,
                "causal_blocks_sparse": c.causal_sparse,
                "kept_blocks_all": float(c.kept_all[r]), "causal_blocks_all": c.causal_all,
                "score": score(sample.metric, text, sample.outputs) if sample.outputs and text is not None else float("nan"),
                "metric": sample.metric,
                "nll_gold": float(nll_gold[r]), "nll_dense_answer": float(measured["nll"][r]),
                **{k: float(measured[k][r]) for k in DIVERGENCE_COLUMNS},
                **{f"null_{k}": float(null.get(k, float("nan"))) for k in NULL_COLUMNS},
                "answer": text, "answer_tokens": -1 if answers[r] is None else len(answers[r]), "outputs": list(sample.outputs),
                **{f"f_{k}": v for k, v in features.items()},
                **{f"seconds_{k}": v for k, v in seconds.items()},
            })
        return records


DIVERGENCE_COLUMNS = ("kl_mean", "kl_max", "top1_agree", "agree_prefix", "gap_max", "answer_positions")
NULL_COLUMNS = (*DIVERGENCE_COLUMNS, "nll_rise", "same_answer", "score")


def divergence_from(logp: torch.Tensor, valid: torch.Tensor, answers: list[list[int]], ref: list[int]) -> dict:
    """Raw measurements of each row r against its reference row ref[r] (the dense row of its sample),
    along the reference's answer (teacher forced, T+1 positions: each answer token's and the stop's):
    `nll` (mean NLL of the answer's tokens, NaN for an empty answer), `kl_mean`/`kl_max` (KL(ref || row)
    over positions, nats), `top1_agree` (share of positions whose argmax equals the reference's),
    `agree_prefix` (positions before the first disagreement), `gap_max` (largest log-prob deficit of
    the reference's argmax token below the row's own argmax: 0 when the row would pick it everywhere),
    `answer_positions`. All from logits the labeler computes anyway: no extra forward. Tensors [R] on the CPU."""
    idx = torch.tensor(ref, device=logp.device)
    ref_logp = logp[idx]
    mask = valid.float()
    count = mask.sum(1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0) * mask
    ref_top = ref_logp.argmax(-1)
    agree = (logp.argmax(-1) == ref_top) | ~valid
    gap = (logp.max(-1).values - logp.gather(-1, ref_top[..., None])[..., 0]) * mask
    tokens, tok_valid = pad_rows(answers, 0, logp.device)
    width = min(tokens.shape[1], logp.shape[1])
    tok_lp = logp[:, :width].gather(-1, tokens[:, :width, None])[..., 0] * tok_valid[:, :width]
    n_tok = tok_valid[:, :width].sum(1)
    return {k: v.detach().cpu() for k, v in {
        "nll": torch.where(n_tok > 0, -tok_lp.sum(1) / n_tok.clamp_min(1), torch.nan),
        "kl_mean": kl.sum(1) / count, "kl_max": kl.max(1).values,
        "top1_agree": (agree.float() * mask).sum(1) / count, "agree_prefix": agree.int().cumprod(1).mul(valid).sum(1).float(),
        "gap_max": gap.max(1).values, "answer_positions": count}.items()}


def free_memory(device: torch.device) -> None:
    """Return what an out-of-memory batch left behind (its tensors are unreachable by now)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out if re.fullmatch(r"[0-9a-f]{40}", out) else "unknown"


def store_meta(job: LabelJobConfig, lm: LoadedModel, device: torch.device) -> dict:
    """The store's self-description; `device` is where labeling will run (not where the model was loaded)."""
    import transformers
    data = data_identity(job.data)
    return {
        "identity": {"model": lm.fingerprint, "dtype": str(next(lm.model.parameters()).dtype),
                     "sparse": asdict(job.sparse), "levels": list(job.labeling.levels), "data": data,
                     "feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES)},
        "model_name": lm.name, "criterion": asdict(job.criterion),
        "backend": resolve_backend(job.sparse.backend, device), "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "git_sha": _git_sha(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
