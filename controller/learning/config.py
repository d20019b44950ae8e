"""Typed, frozen config dataclasses of the controller job (train.py's whole pipeline).

Owns SplitConfig, NetConfig, TrainConfig, CalibrationConfig, LoggingConfig and ControllerJobConfig.
A ControllerJobConfig extends the labeling job (model, sparse, data, criterion, labeling) with where
to find labels, how to split, train, calibrate, log and where to write; `label_job()` gives the
labeling part back. YAML files in configs/ are instances (loaded by `data.config.load_config`).
Imports `data`; never `train.py`/`eval.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.config import CriterionConfig, DataConfig, LabelingConfig, LabelJobConfig, ModelConfig, SparseConfig
from data.errors import UserError


STAGES = ("label", "train", "evaluate")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of generated documents (groups) per split; the test split gets the rest."""
    train: float = 0.5
    val: float = 0.1
    calibration: float = 0.2
    seed: int = 0

    def __post_init__(self):
        parts = (self.train, self.val, self.calibration)
        if self.seed < 0:
            raise UserError(f"split.seed must be >= 0, got {self.seed}")
        if min(parts) <= 0 or sum(parts) >= 1:
            raise UserError(f"split fractions must be > 0 and sum below 1 (the test split gets the rest), got {parts}")

    @property
    def test(self) -> float:
        return 1.0 - self.train - self.val - self.calibration


@dataclass(frozen=True)
class NetConfig:
    hidden: int = 64
    depth: int = 2
    dropout: float = 0.1

    def __post_init__(self):
        if not 1 <= self.hidden <= 65536 or not 1 <= self.depth <= 64 or not 0 <= self.dropout < 1:
            raise UserError("net needs hidden in 1..65536, depth in 1..64 and dropout in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    task_dropout: float = 0.3      # share of training samples whose task is shown as `unknown`; 1 = the
                                   # controller never uses the task name (it is always shown `unknown`)
    patience: int = 30             # early stopping on validation loss
    compute_weight: float = 1.0    # loss weight per request ~ (n / max n)^compute_weight (long requests hold the compute)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.task_dropout <= 1:
            raise UserError(f"train.task_dropout must be in [0, 1], got {self.task_dropout}")
        if self.max_epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UserError("train needs max_epochs >= 1, batch_size >= 1 and lr > 0")
        if self.weight_decay < 0 or self.compute_weight < 0 or self.patience < 1 or self.seed < 0:
            raise UserError("train needs weight_decay >= 0, compute_weight >= 0, patience >= 1 and seed >= 0")


MAX_STRATUM_TOKENS = 2**31 - 1   # far beyond any model's window, inside int32/int64 arithmetic


def check_strata(strata, name: str) -> tuple[int, ...]:
    """Length strata as increasing positive token counts, or one line saying what is wrong."""
    values = list(strata)
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in values) or values != sorted(set(values)):
        raise UserError(f"{name} must be increasing positive token counts, got {values}")
    if values and values[-1] > MAX_STRATUM_TOKENS:   # stored as int64 and compared to lengths: keep it a length
        raise UserError(f"{name}: {values[-1]} tokens is longer than any context (at most {MAX_STRATUM_TOKENS:,}); "
                        "give stratum bounds within your prompts' lengths, e.g. 2048,8192")
    return tuple(values)


@dataclass(frozen=True)
class CalibrationConfig:
    """Learn-then-Test: P(violation rate <= alpha) >= 1 - delta on the calibration split."""
    alpha: float = 0.05
    delta: float = 0.1
    sweep: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)   # alphas of the trade-off curve
    decision: str = "compute_aware"   # compute_aware or threshold (see controller/runtime/policy.py)
    guard_p: float = 0.01      # shift guard: requests whose conformal p-value is below this run at `fallback`
    guard_k: int = 5           # shift guard: k of the k-th nearest calibration request
    fallback: float = 0.0      # the level flagged requests run at (0 = dense, the only one that is always safe)
    # the first requests of every stream (after attach or handle.monitor.reset()) run at `fallback` while the
    # stream monitor watches them: a shift it would alarm on within them never gets a sparse decision
    guard_warmup: int = 0
    # token upper bounds of length strata (every stratum but the last), each calibrated on its own requests at
    # delta / strata, so the bound holds within every stratum; () = one threshold for the calibrated mix of lengths
    length_strata: tuple[int, ...] = ()
    mode: str = "ltt"   # ltt: P(violation rate <= alpha) >= 1 - delta; crc: E[violation rate] <= alpha (no delta)

    def __post_init__(self):
        if math.isnan(self.guard_p) or not 0 <= self.guard_p < 1 or self.guard_k < 1:
            raise UserError(f"calibration.guard_p must lie in [0, 1) and guard_k be >= 1, got {self.guard_p}, {self.guard_k}")
        check_strata(self.length_strata, "calibration.length_strata")
        if not 0 <= self.guard_warmup <= 1_000_000:
            raise UserError(f"calibration.guard_warmup must be a request count in 0..1000000, got {self.guard_warmup}")
        if math.isnan(self.fallback) or not 0 <= self.fallback < 1:
            raise UserError(f"calibration.fallback must be a grid level in [0, 1), got {self.fallback}")
        if self.mode not in ("ltt", "crc"):
            raise UserError(f"calibration.mode must be ltt or crc, got {self.mode!r}")
        if self.decision not in ("compute_aware", "threshold"):
            raise UserError(f"calibration.decision must be compute_aware or threshold, got {self.decision!r}")
        for name, v in [("alpha", self.alpha), ("delta", self.delta), *(("sweep", a) for a in self.sweep)]:
            if math.isnan(v) or not 0 < v < 1:
                raise UserError(f"calibration.{name} must lie in (0, 1), got {v}")


@dataclass(frozen=True)
class LoggingConfig:
    wandb: str = "offline"     # offline, online or disabled (WANDB_MODE overrides)
    project: str = "sparsity-controller"


@dataclass(frozen=True)
class ControllerJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: DataConfig = field(default_factory=lambda: LabelJobConfig().data)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    labels: str | None = None          # an existing label store to reuse; None = label into labeling.out
    split: SplitConfig = field(default_factory=SplitConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    out: str = "runs/controller"
    stages: tuple[str, ...] = ("train", "evaluate")   # label only: ("label",)

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if not self.stages or bad:
            raise UserError(f"stages must be a non-empty list of {list(STAGES)}, got {list(self.stages)}")
        if not any(math.isclose(self.calibration.fallback, g) for g in self.labeling.levels):
            raise UserError(f"calibration.fallback {self.calibration.fallback} is not a grid level "
                            f"{list(self.labeling.levels)}")
        if self.logging.wandb not in ("offline", "online", "disabled"):
            raise UserError(f"logging.wandb must be offline, online or disabled, got {self.logging.wandb!r}")

    def label_job(self) -> LabelJobConfig:
        return LabelJobConfig(model=self.model, sparse=self.sparse, data=self.data,
                              criterion=self.criterion, labeling=self.labeling)
