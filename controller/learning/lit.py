"""Lightning training of the predictor: a LightningDataModule over a label store's splits and a
LightningModule around `SafetyNet`.

Owns `LabelDataModule` (train / val / calibration / test by generated document; normalisation
from the training split; targets y[k] = 1 if the request's label is at least grid level k+1) and
`SafetyModule` (binary cross-entropy per sparse level; a share `task_dropout` of training
requests has its task one-hot replaced by `unknown`, so the controller works when callers cannot
name the task), plus `fit_net`, which runs `Trainer.fit` with early stopping, a CSV logger and
wandb (offline by default), and returns the net with the best validation weights.
Imports `data` and `controller` modules below it.
"""
from __future__ import annotations

import copy
import os
import sys

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from data.features import FEATURE_NAMES

from controller.learning.config import ControllerJobConfig
from controller.guarantee.arrays import LabelArrays
from controller.runtime.net import SafetyNet
from controller.runtime.policy import TASK_COLUMNS, mask_task

LOG_LENGTH_COLUMN = FEATURE_NAMES.index("log_length")


def targets(arrays: LabelArrays) -> np.ndarray:
    """[n, K] y[i, k] = 1 if request i's label is at least sparse level k (monotone by construction)."""
    k = np.arange(1, len(arrays.levels))
    return (arrays.label_index[:, None] >= k[None]).astype(np.float32)


def normalisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std of the training features; the task one-hot is left as it is (mean 0, std 1)."""
    mean, std = features.mean(0), features.std(0)
    mean[TASK_COLUMNS], std[TASK_COLUMNS] = 0.0, 1.0
    return mean, np.where(std > 1e-6, std, 1.0)


class LabelDataModule(L.LightningDataModule):
    def __init__(self, arrays: LabelArrays, splits: dict[str, np.ndarray], batch_size: int, seed: int):
        super().__init__()
        self.arrays, self.splits, self.batch_size, self.seed = arrays, splits, batch_size, seed

    def dataset(self, split: str) -> TensorDataset:
        part = self.arrays.subset(self.splits[split])
        return TensorDataset(torch.from_numpy(part.features), torch.from_numpy(targets(part)))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=4096)


class SafetyModule(L.LightningModule):
    def __init__(self, net: SafetyNet, lr: float, weight_decay: float, task_dropout: float,
                 compute_weight: float = 0.0, max_log_length: float = 0.0):
        super().__init__()
        self.net, self.lr, self.weight_decay, self.task_dropout = net, lr, weight_decay, task_dropout
        self.compute_weight, self.max_log_length = compute_weight, max_log_length
        self.save_hyperparameters(ignore=["net"])

    def loss(self, features: torch.Tensor, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE per request (mean over levels), weighted by (n / max n)^compute_weight, normalised."""
        per_request = F.binary_cross_entropy_with_logits(self.net(features), y, reduction="none").mean(1)
        w = torch.exp(self.compute_weight * (raw[:, LOG_LENGTH_COLUMN] - self.max_log_length))
        return (per_request * w).sum() / w.sum()

    def training_step(self, batch, batch_idx):
        x, y = batch
        drop = torch.rand(x.shape[0], device=x.device) < self.task_dropout
        loss = self.loss(mask_task(x, drop), x, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for name, feats in (("val_loss", x), ("val_loss_unknown_task", mask_task(x, torch.ones(len(x), dtype=torch.bool)))):
            self.log(name, self.loss(feats, x, y), prog_bar=name == "val_loss", batch_size=x.shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class KeepBest(Callback):
    """Keeps a copy of the net's weights at the best validation loss (no pickle files)."""

    def __init__(self):
        self.best, self.state, self.epoch = float("inf"), None, -1

    def on_validation_epoch_end(self, trainer, module):
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not trainer.sanity_checking and float(loss) < self.best:
            self.best, self.epoch = float(loss), trainer.current_epoch
            self.state = copy.deepcopy(module.net.state_dict())


def make_loggers(job: ControllerJobConfig, out: str) -> list:
    loggers = [CSVLogger(out, name="logs", version="")]
    mode = os.environ.get("WANDB_MODE", job.logging.wandb)
    if mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger
        loggers.append(WandbLogger(project=job.logging.project, save_dir=out, offline=mode != "online"))
    return loggers


def fit_net(job: ControllerJobConfig, data: LabelDataModule, out: str) -> tuple[SafetyNet, dict]:
    """Train with early stopping; returns the net at its best validation loss and a summary."""
    L.seed_everything(job.train.seed, workers=True, verbose=False)
    train = data.arrays.subset(data.splits["train"])
    net = SafetyNet(len(FEATURE_NAMES), len(data.arrays.levels) - 1, job.net.hidden, job.net.depth, job.net.dropout)
    net.set_normalisation(*map(torch.from_numpy, normalisation(train.features)))
    module = SafetyModule(net, job.train.lr, job.train.weight_decay, job.train.task_dropout,
                          job.train.compute_weight, float(train.features[:, LOG_LENGTH_COLUMN].max()))
    best = KeepBest()
    from data.runner import quiet_lightning
    quiet_lightning()
    trainer = L.Trainer(max_epochs=job.train.max_epochs, accelerator="cpu", devices=1, deterministic=True,
                        logger=make_loggers(job, out), enable_checkpointing=False,
                        enable_progress_bar=sys.stderr.isatty(),   # a bar on a terminal, none in logs and CI
                        enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[best, EarlyStopping("val_loss", patience=job.train.patience)])
    trainer.fit(module, datamodule=data)
    net.load_state_dict(best.state)
    for logger in trainer.loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":  # finish now, so its summary does not print after ours
            logger.experiment.finish()
    return net.eval(), {"best_val_loss": best.best, "best_epoch": best.epoch, "epochs": trainer.current_epoch}
