"""Checkpoints: fixed keys, written atomically by rank 0, loaded with `weights_only=True`.

Files are `<run_dir>/checkpoints/epoch-NNNN.pt`; `epoch` inside is the number of epochs
completed. A temp file in the same directory is renamed over the final name, so a reader
never sees half a checkpoint even if the writer is killed mid-write.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "config")
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`), so saved keys carry no `module.` prefix."""
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:04d}.pt"


def save_checkpoint(run_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, config: dict[str, Any], keep: int = 2) -> Path:
    """Write epoch `epoch`'s checkpoint atomically and prune all but the newest `keep`."""
    final = checkpoint_path(run_dir, epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "config": config,
    }
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint (weights_only=True) and check it has exactly the fixed keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != set(KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a training checkpoint (keys {got}, expected {list(KEYS)})")
    return state


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint in the run directory, or None when there is none."""
    found = list_checkpoints(run_dir)
    return load_checkpoint(found[-1]) if found else None
