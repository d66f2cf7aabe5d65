"""Checkpoints through Ray Train: fixed keys, one complete file, loaded with `weights_only=True`.

Saving (`report`): every rank calls `ray.train.report` (a barrier); rank 0 alone passes a
`Checkpoint.from_directory` of a local temp folder holding `checkpoint.pt` (written under a
temp name, fsynced, renamed). Ray uploads the folder to `<run_dir>/epoch-NNNN/` on the run's
storage (a path or `s3://...`) and registers it in its record only after the upload
completed; `CheckpointConfig(num_to_keep=...)` prunes the old ones.

Resuming (`restore`): `ray.train.get_checkpoint()` is the newest registered checkpoint,
the same one for every rank, after a worker-group restart and on a re-run of the same
storage_path and name (Ray reloads its record from the run directory); `epoch` inside is
the number of epochs completed.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "config")
# Step checkpoints add where the run stands and every rank's own state (resume.py).
EXTRA_KEYS = ("position", "ranks")
FILE = "checkpoint.pt"

log = logging.getLogger("train")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`), so saved keys carry no `module.` prefix."""
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    """Every RNG training draws from in this process: torch CPU (dropout on CPU), CUDA (dropout
    on the GPU, all devices), Python's. numpy's is not used by training."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dir_name(epoch: int, step: int | None = None) -> str:
    """The checkpoint's folder under the run directory: `epoch-NNNN` after an epoch, or
    `epoch-NNNN-step-NNNNNNN` inside one (NNNN: the epochs completed, then the global step)."""
    return f"epoch-{epoch:04d}" if step is None else f"epoch-{epoch:04d}-step-{step:07d}"


def write_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, epoch: int, config: dict[str, Any], **extra: Any) -> Path:
    """Write `folder/checkpoint.pt` with the fixed keys: a temp name, fsync, then rename, so
    the folder never holds half a checkpoint under the final name."""
    final = Path(folder) / FILE
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "config": config,
        **{k: extra[k] for k in EXTRA_KEYS if k in extra},
    }
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint file (weights_only=True) and check it has the fixed keys (and at
    most the step checkpoint's extra ones)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not set(KEYS) <= set(state) <= set(KEYS) | set(EXTRA_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a training checkpoint (keys {got}, expected {list(KEYS)})")
    return state


def report(metrics: dict[str, Any], *, rank: int, save: bool, model: nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, config: dict[str, Any],
           step: int | None = None, **extra: Any) -> None:
    """`ray.train.report(metrics)` on every rank; with `save`, rank 0 attaches the checkpoint
    of `epoch` (returns once Ray has uploaded it: CheckpointUploadMode.SYNC)."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            t0 = time.perf_counter()
            path = write_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                    config=config, **extra)
            size_mb, t_write = path.stat().st_size / 2**20, time.perf_counter() - t0
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        t1 = time.perf_counter()
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name(epoch, step))
        if rank == 0:
            log.info("checkpoint %s: %.1f MB, written in %.2fs, reported in %.2fs (upload and barrier)",
                     dir_name(epoch, step), size_mb, t_write, time.perf_counter() - t1)


def restore() -> dict[str, Any] | None:
    """The newest checkpoint Ray registered for this run (the same for every rank), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    t0 = time.perf_counter()
    with checkpoint.as_directory() as folder:  # remote: downloaded once per node, then removed
        state = load_checkpoint(Path(folder) / FILE)
    log.info("checkpoint %s loaded in %.2fs", checkpoint.path.rstrip("/").rsplit("/", 1)[-1],
             time.perf_counter() - t0)
    return state
