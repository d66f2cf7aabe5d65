"""The learning-rate schedule as a function of training progress measured in epochs (a
fraction: samples trained / samples per epoch), not of a step counter tied to one
steps-per-epoch. A run resumed with another `workers` or `batch_size` continues the same
curve; with `lr_base_batch` the peak follows the global batch of the steps being taken.

    lr = lr_at(cfg, global_batch, progress, step_progress)

`progress` is the epochs done before the step (epochs completed + samples trained in the
current one / the split's size), `step_progress` the fraction of an epoch one step trains
(warm-up ends on the step that completes `warmup_epochs`, as the per-step warm-up did).
`plateau` (the paper's rule) stays an epoch-level ReduceLROnPlateau.
"""
from __future__ import annotations

import math

import torch

from orchestration.config import TrainConfig


def peak_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The lr after warm-up: linearly scaled to the global batch when `lr_base_batch` is set."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def lr_at(cfg: TrainConfig, global_batch: int, progress: float, step_progress: float) -> float:
    """The lr of a step taken at `progress` epochs (constant, cosine or step schedules)."""
    peak = peak_lr(cfg, global_batch)
    return peak * lr_factor(cfg, progress, step_progress, cfg.min_lr / peak if peak else 0.0)


def lr_factor(cfg: TrainConfig, progress: float, step_progress: float, floor: float = 0.0) -> float:
    """The schedule's multiplier of the peak lr for a step taken at `progress` epochs."""
    if cfg.warmup_epochs and progress + step_progress < cfg.warmup_epochs + 1e-12:
        return (progress + step_progress) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        t = (progress - cfg.warmup_epochs) / max(1e-12, cfg.epochs - cfg.warmup_epochs)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))
    if cfg.schedule == "step":
        return cfg.step_factor ** int((progress + 1e-9) // cfg.step_epochs)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LrSchedule:
    """Sets each step's lr from the progress in epochs (constant, cosine, step schedules), or
    steps torch's ReduceLROnPlateau on val top-1 at epoch ends (`plateau`, the paper's rule).
    Progress is epochs completed + samples trained in the current epoch / `train_size` (the
    split's sample count): the same curve whatever the world size or batch."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, global_batch: int,
                 train_size: int) -> None:
        self.cfg, self.optimizer = cfg, optimizer
        self.global_batch, self.train_size = global_batch, max(1, train_size)
        self.plateau = None
        if cfg.schedule == "plateau":
            set_lr(optimizer, peak_lr(cfg, global_batch))
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)

    def progress(self, epochs_done: int, epoch_samples: int) -> float:
        return epochs_done + min(epoch_samples, self.train_size) / self.train_size

    def before_step(self, epochs_done: int, epoch_samples: int) -> None:
        if self.plateau is None:
            set_lr(self.optimizer, lr_at(self.cfg, self.global_batch, self.progress(epochs_done, epoch_samples),
                                         self.global_batch / self.train_size))

    def after_epoch(self, top1: float) -> None:
        if self.plateau is not None:
            self.plateau.step(top1)

    def state_dict(self) -> dict:
        return {"plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])  # the lr itself is in the optimizer's state
