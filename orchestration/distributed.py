"""The few collectives the loop needs, each an identity on a single process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`), so saved keys carry no `module.` prefix."""
    return model.module if hasattr(model, "module") else model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics before eval (DDP broadcasts them only
    at the start of a training forward, and eval runs on the unwrapped module)."""
    if is_distributed():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)
