"""Where a worker computes: its device and CPU threads, the model made ready for it (memory
format, DDP through Ray Train, the optional bf16 gradient all-reduce) and its precision
(autocast: bf16 on GPU and CPU, fp16 with a GradScaler on GPU)."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from orchestration.config import TrainConfig

log = logging.getLogger("train")


def setup_compute(cfg: TrainConfig, local_workers: int) -> torch.device:
    """The worker's device (the GPU Ray assigned, never a hard-coded 0); on CPU, torch threads =
    this node's cores shared by its workers."""
    import ray.train.torch

    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cfg.torch_threads or max(1, cores // max(1, local_workers)))
    return device


def prepare(model: nn.Module, cfg: TrainConfig, world_size: int) -> nn.Module:
    """The model on this worker's device, wrapped in DDP when there are several workers."""
    import ray.train.torch

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if cfg.grad_compression == "bf16" and world_size > 1:
        compress_gradients_bf16(model)
        log.info("grad_compression bf16: DDP all-reduces the gradients in bf16")
    return model


def compress_gradients_bf16(model: nn.Module) -> None:
    """DDP all-reduces each gradient bucket cast to bf16 (half the bytes on the wire), then
    casts back and divides by the world size: torch's `bf16_compress_hook`. DDP refuses that
    hook by name without CUDA + NCCL; the function itself runs on gloo too, so it is
    registered under another name (docs/SCALING.md measures both)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

    def bf16_allreduce(state, bucket):
        return bf16_compress_hook(state, bucket)

    model.register_comm_hook(None, bf16_allreduce)


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The forward pass's precision: bf16 autocast on either device (CPU: oneDNN's bf16
    kernels), fp16 autocast on CUDA (the config refuses fp16 on CPU workers), else fp32."""
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=cfg.precision != "fp32")


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling (the small gradients fp16 would flush to zero); a pass-through
    otherwise. Its scale is not checkpointed: after a resume it re-grows in a few steps."""
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
