"""Running labeling through Lightning: `Trainer.predict` on one CPU, one GPU or several (DDP).

Owns `run_labeling` and its Lightning parts: `SampleShards` (the samples not yet in the store,
split by id into disjoint, deterministic per-rank shares `todo[rank::world]` after every rank has
read the store; each rank generates only its own share, lazily, in the loader), `LabelingModule` (predict_step = `Labeler.label_samples` on a batch of `labeling.batch_samples` samples), and `ShardWriter` (each rank
writes its own parquet shards every `shard_size` samples, and rank 0 appends the run's throughput
to runs.jsonl). Imports `sparse_kernels` and lower `data` modules; never `controller`.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from sparse_kernels import unsupported_reason

from .config import LabelJobConfig
from .labeling import Labeler, PlannedSample, plan_samples, realize, store_meta
from .models import LoadedModel, load_model, resolve_dtype
from .errors import UserError
from .outputs import check_store_target
from .store import LabelStore, StoreLock
from .tasks import Sample, prompt_ids

log = logging.getLogger(__name__)
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}


def _as_list(batch: list[Sample]) -> list[Sample]:
    return list(batch)


LAUNCHER_ENV = "SPARSITY_LABELING_LAUNCHER"   # pid of the process that started a labeling run
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """End this helper process when `parent` dies: on Linux the kernel sends SIGKILL at the parent's
    death (prctl PR_SET_PDEATHSIG), so a `kill -9` of a labeling job leaves no DDP rank or loader
    worker (~0.5 GB each) behind. If the parent is already gone (reparented), exit now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _worker_dies_with(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


@contextlib.contextmanager
def launcher_marked():
    """Record this process as the labeling run's launcher for the ranks it starts (they inherit the
    environment); the launcher itself is left alone."""
    before = os.environ.get(LAUNCHER_ENV)
    if before is None:
        os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAUNCHER_ENV, None)


def arm_rank() -> None:
    """In a DDP rank started by the launcher (not the launcher itself): die with the launcher."""
    launcher = int(os.environ.get(LAUNCHER_ENV, "0") or 0)
    if launcher and launcher != os.getpid():
        die_with_parent(launcher)


class PlannedSamples(Dataset):
    """A rank's share; generated samples are made when the loader asks (in its workers, if any)."""

    def __init__(self, items: list[PlannedSample | Sample], tokenizer):
        self.items, self.tokenizer = items, tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample | Unmade:
        try:
            return realize(self.items[i], self.tokenizer)
        except UserError as e:   # e.g. a task whose smallest instance is longer than the target with this tokenizer
            return Unmade(self.items[i].sample_id, str(e))


@dataclass(frozen=True)
class Unmade:
    """A planned sample that this tokenizer cannot make at its target length: skipped with a
    warning (not written; a rerun tries it again), so one sample does not stop a labeling job."""
    sample_id: str
    reason: str


class SampleShards(L.LightningDataModule):
    """Every rank computes the same plan and done set, then takes `todo[rank::world]`. Only ids
    are needed for that, so no rank generates samples it will not label."""

    def __init__(self, plan: list[PlannedSample | Sample], store: LabelStore, tokenizer, workers: int = 0,
                 batch_samples: int = 1):
        super().__init__()
        self.plan, self.store, self.tokenizer, self.workers = plan, store, tokenizer, workers
        self.batch_samples = batch_samples
        self.todo: list[PlannedSample | Sample] = []

    def setup(self, stage: str) -> None:
        done = self.store.done_ids()
        self.todo = [s for s in self.plan if s.sample_id not in done]
        self.trainer.strategy.barrier("labeling-read-store")  # nobody writes before all have read

    def predict_dataloader(self) -> DataLoader:
        share = self.todo[self.trainer.global_rank::self.trainer.world_size]
        if self.workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(PlannedSamples(share, self.tokenizer), batch_size=self.batch_samples, collate_fn=_as_list,
                          num_workers=self.workers, persistent_workers=False,
                          worker_init_fn=functools.partial(_worker_dies_with, os.getpid()) if self.workers else None)


class LabelingModule(L.LightningModule):
    def __init__(self, lm: LoadedModel, job: LabelJobConfig):
        super().__init__()
        self.model = lm.model
        self.lm, self.job = lm, job
        self.labeler: Labeler | None = None

    def setup(self, stage: str) -> None:
        arm_rank()   # a rank other than the launcher ends with it, even on kill -9

    def on_predict_start(self) -> None:
        self.labeler = Labeler(self.lm, self.job)  # after Lightning moved the model to its device

    def transfer_batch_to_device(self, batch: list[Sample], device, dataloader_idx: int) -> list[Sample]:
        return batch  # samples are text; the labeler moves their token ids itself

    def predict_step(self, samples: list[Sample | Unmade], batch_idx: int) -> list[dict]:
        for s in samples:
            if isinstance(s, Unmade):
                log.warning("skipped sample %s: %s", s.sample_id, s.reason)
        made = [s for s in samples if not isinstance(s, Unmade)]
        return self.labeler.label_samples(made) if made else []


class ProgressLines(L.Callback):
    """Labeling progress as plain lines on stderr, for runs whose stderr is not a terminal (logs, CI,
    nohup), where a progress bar shows nothing: after the first batch (its time says how long the
    whole job will take on this machine), then at most every `every_s` seconds, and at the end."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.start = self.last = 0.0
        self.batches = self.requests = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches, self.requests = self.batches + 1, self.requests + len(batch)
        now, total = time.perf_counter(), int(sum(trainer.num_predict_batches))
        if trainer.is_global_zero and (self.batches in (1, total) or now - self.last >= self.every_s):
            self.last = now
            print(progress_line(self.batches, total, self.requests, now - self.start), file=sys.stderr, flush=True)


def progress_line(batches: int, total: int, requests: int, seconds: float) -> str:
    left = seconds / batches * (total - batches)
    return (f"labeling: {batches}/{total} batches ({requests} requests) in {seconds:.0f} s, "
            f"{requests / max(seconds, 1e-9):.2f} requests/s, about {left / 60:.1f} min left on this machine")


class ShardWriter(BasePredictionWriter):
    """Writes each rank's shards (every `shard_size` samples, rounded up to whole batches);
    measures throughput with and without each rank's first batch (which carries compilation)."""

    def __init__(self, store: LabelStore, shard_size: int):
        super().__init__(write_interval="batch")
        self.store, self.shard_size = store, shard_size
        self.buffer: list[dict] = []
        self.buffered_samples = 0
        self.counts = torch.zeros(4, dtype=torch.float64)
        self.start = self.after_first = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        # created here, in each rank's process: a tensor made in __init__ would be shared memory
        # across ddp_spawn workers. Sample-levels, tokens, and both again after the first sample.
        self.counts = torch.zeros(4, dtype=torch.float64)
        trainer.strategy.barrier("labeling-start")
        self.start = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.buffer += prediction
        self.buffered_samples += len(batch)
        done = torch.tensor([len(prediction), sum(r["n_tokens"] for r in prediction)], dtype=torch.float64)
        self.counts[:2] += done
        if batch_idx == 0:
            self.after_first = time.perf_counter()
        else:
            self.counts[2:] += done
        if self.buffered_samples >= self.shard_size:
            self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        if self.buffer:
            self.store.write_shard(self.buffer, rank)
            self.buffer, self.buffered_samples = [], 0

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run that stops on an error (a sample that does not fit in memory, an interrupt) keeps
        the whole samples it labeled: a rerun resumes after them."""
        self._flush(trainer.global_rank)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._flush(trainer.global_rank)
        end = time.perf_counter()
        dev = pl_module.device
        totals = trainer.strategy.reduce(self.counts.to(dev), reduce_op="sum").cpu()
        spans = torch.tensor([end - self.start, end - (self.after_first or end)], dtype=torch.float64, device=dev)
        spans = -trainer.strategy.reduce(-spans, reduce_op="min").cpu() if trainer.world_size > 1 else spans.cpu()
        if trainer.is_global_zero and totals[0] > 0:
            self.store.append_run(_run_record(trainer, dev, totals.tolist(), spans.tolist()))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        end_process_group(trainer)


def end_process_group(trainer) -> None:
    """After a distributed labeling run (its workers exit next): meet the other ranks, then destroy the
    process group while every rank is alive. Lightning destroys only NCCL groups at exit; a gloo group
    left to interpreter shutdown can abort a worker ('terminate called without an active exception',
    seen once in CI). A later run initialises a new group."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("labeling-end")
        torch.distributed.destroy_process_group()


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 3) if seconds > 0 and count > 0 else None


def _run_record(trainer, dev: torch.device, totals: list[float], spans: list[float]) -> dict:
    """Throughput of one run over all ranks; `steady` excludes each rank's first sample."""
    return {"world_size": trainer.world_size, "accelerator": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "sample_levels": int(totals[0]), "tokens": int(totals[1]), "seconds": round(spans[0], 3),
            "sample_levels_per_s": _rate(totals[0], spans[0]), "tokens_per_s": _rate(totals[1], spans[0]),
            "steady_sample_levels_per_s": _rate(totals[2], spans[1]), "steady_tokens_per_s": _rate(totals[3], spans[1]),
            "torch": torch.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# Lightning's notices that say nothing about this run: accelerator inventory, advertisements, and two
# warnings about its own internals (a deprecated pytree check; our module's batch transfer)
_LIGHTNING_NOISE = (".*isinstance\\(treespec, LeafSpec\\).*", ".*overridden `transfer_batch_to_device`.*",
                    ".*does not have many workers.*")


def quiet_lightning() -> None:
    """Keep Lightning to warnings and errors (no 'GPU available' inventory, no tips) and drop its
    internal notices listed in `_LIGHTNING_NOISE`; the commands call it before building a Trainer."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in _LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=message)


def make_trainer(job: LabelJobConfig, callbacks) -> L.Trainer:
    """The labeling Trainer: with `labeling.progress`, a bar on a terminal, else `ProgressLines`."""
    quiet_lightning()
    bar = job.labeling.progress and sys.stderr.isatty()
    lines = [ProgressLines()] if job.labeling.progress and not bar else []
    return L.Trainer(accelerator=ACCELERATORS[job.model.device], devices=job.labeling.devices,
                     strategy=job.labeling.strategy, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, use_distributed_sampler=False, inference_mode=True,
                     enable_progress_bar=bar, callbacks=[*callbacks, *lines])


def target_device(job: LabelJobConfig) -> torch.device:
    wants_gpu = job.model.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if wants_gpu else "cpu")


def load_for_labeling(job: LabelJobConfig) -> LoadedModel:
    """Load on the CPU in the accelerator's dtype; Lightning moves it to each rank's device."""
    dtype = resolve_dtype(job.model.dtype, target_device(job))
    return load_model(job.model.name, str(dtype).removeprefix("torch."), "cpu", job.model.rope_scaling)


def check_devices(job: LabelJobConfig) -> None:
    """Refuse more ranks than the machine has (Lightning would wait for them forever)."""
    dev = target_device(job)
    have = torch.cuda.device_count() if dev.type == "cuda" else (os.cpu_count() or 1)
    if job.labeling.devices > have:
        raise UserError(f"labeling.devices={job.labeling.devices} but this machine has {have} "
                        f"{'CUDA devices' if dev.type == 'cuda' else 'CPU cores'}; use at most {have}")


def check_layers(job: LabelJobConfig, lm: LoadedModel) -> None:
    """The sparse settings fit this model (layer indices, attention the sparse paths can honour)."""
    reason = unsupported_reason(lm.model)
    if reason is not None:
        raise UserError(f"{job.model.name}: {reason}")
    n = getattr(getattr(lm.model, "config", None), "num_hidden_layers", None)
    layers = (*job.sparse.dense_layers, *job.sparse.probe_layers)
    if isinstance(n, int) and layers and max(layers) >= n:
        raise UserError(f"sparse.dense_layers / probe_layers name layer {max(layers)}, but {job.model.name} has "
                        f"{n} layers (0..{n - 1})")


def _text_config(lm: LoadedModel):
    cfg = lm.model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def request_lengths(job: LabelJobConfig, lm: LoadedModel, plan: list[PlannedSample | Sample]) -> list[tuple[int, str]]:
    """(tokens, sample id) of every request the job plans: read prompts (RULER files, the user's
    prompts) measured with the model's tokenizer, generated ones at their target length."""
    return [(p.length, p.sample_id) if isinstance(p, PlannedSample)
            else (len(prompt_ids(lm.tokenizer, p, job.data.chat_template)), p.sample_id) for p in plan]


def check_window(job: LabelJobConfig, lm: LoadedModel, lengths: list[tuple[int, str]], read: set[str]) -> None:
    """Refuse requests longer than the model's window, in one line naming the longest (read prompts
    measured with its tokenizer; generated ones at their target length)."""
    window = getattr(_text_config(lm), "max_position_embeddings", None)
    if not isinstance(window, int) or not lengths:
        return
    over = sorted(((n, sid) for n, sid in lengths if n > window and sid in read), reverse=True)
    if over:
        raise UserError(f"{len(over)} of the prompts are longer than {job.model.name}'s window of {window} tokens "
                        f"(the longest, {over[0][1]}, has {over[0][0]}); shorten or drop them, or use a model with a "
                        "longer context")
    longest = max((n for n, sid in lengths if sid not in read), default=0)
    if longest > window:
        raise UserError(f"data.lengths reach {longest} tokens, beyond {job.model.name}'s window of {window} tokens; "
                        "lower data.lengths or use a model with a longer context")


def labeling_bytes(job: LabelJobConfig, lm: LoadedModel, lengths: list[int]) -> int:
    """A floor on what labeling the job's worst batch holds at once: the weights, the KV caches of
    its `batch_samples` longest requests x grid levels rows (kept from prefill through decoding),
    and the longest request's prefill MLP activations (levels rows x gate, up, product)."""
    cfg = _text_config(lm)
    width = next(lm.model.parameters()).element_size()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rows = len(job.labeling.levels)
    worst = sorted(lengths, reverse=True)[:job.labeling.batch_samples]
    kv = rows * sum(worst) * 2 * cfg.num_hidden_layers * heads * head_dim
    mlp = rows * max(worst, default=0) * 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    return (kv + mlp) * width + sum(p.numel() * p.element_size() for p in lm.model.parameters())


def device_memory_bytes(dev: torch.device) -> int:
    """The device's total memory (a GPU's, or this machine's RAM)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(job: LabelJobConfig, lm: LoadedModel, lengths: list[int]) -> None:
    """Refuse, before anything is written, a job whose floor estimate exceeds the device's memory."""
    dev = target_device(job)
    total = device_memory_bytes(dev)
    need = labeling_bytes(job, lm, lengths)
    if need > 0.95 * total:
        raise UserError(f"labeling {max(lengths, default=0)}-token requests, {job.labeling.batch_samples} samples x "
                        f"{len(job.labeling.levels)} levels at once, needs at least {need / 2**30:.1f} GiB (weights, KV "
                        f"caches, activations), more than this {dev.type} device's {total / 2**30:.1f} GiB; lower "
                        "the batch (labeling.batch_samples, calibrate.py --batch-samples) or the prompts' lengths")


def run_labeling(job: LabelJobConfig, lm: LoadedModel | None = None) -> LabelStore | None:
    """Label every sample of `job` not yet in its store. Returns the store on global rank 0,
    None on the other ranks of a distributed run."""
    check_store_target(job.labeling.out, f"labeling.out={job.labeling.out}")
    check_devices(job)
    lm = lm or load_for_labeling(job)
    check_layers(job, lm)
    plan = plan_samples(job.data)
    lengths = request_lengths(job, lm, plan)
    check_window(job, lm, lengths, {p.sample_id for p in plan if isinstance(p, Sample)})
    check_memory(job, lm, [n for n, _ in lengths])
    meta = store_meta(job, lm, target_device(job))
    with StoreLock(job.labeling.out), launcher_marked():
        store = LabelStore.open_for_writing(job.labeling.out, meta)
        writer = ShardWriter(store, job.labeling.shard_size)
        trainer = make_trainer(job, [writer])
        shards = SampleShards(plan, store, lm.tokenizer, job.labeling.loader_workers, job.labeling.batch_samples)
        trainer.predict(LabelingModule(lm, job), datamodule=shards, return_predictions=False)   # noise: quiet_lightning
    return store if trainer.is_global_zero else None
