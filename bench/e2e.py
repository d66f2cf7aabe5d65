"""The end-to-end figure: the share of a training step spent waiting for data.

Trains AlexNet (the loader bench: `alexnet-bn` at a small crop, so that a CPU machine runs it
in seconds; the GPU check: bf16 autocast and channels_last on the GPU) for a few steps on one
loader and times, per step, the wait for the next batch against the whole step (the device
synchronised at its end). `train_steps` is the one data-wait loop of the benches; `data_wait`
builds the loader and the model for it from `make_loader` arguments, in-process.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from bench.figures import figure
from model import build_model
from pipeline import make_loader


def train_steps(loader: Any, net: nn.Module, device: str, steps: int, warmup: int, windows: int,
                bf16: bool = False, channels_last: bool = False, weight_decay: float = 5e-4) -> dict:
    """Train `net` (SGD) for `steps` timed steps after `warmup` untimed ones, rolling over
    epochs (a new epoch's start-up is part of what the loader costs). Returns the data-wait
    share (the wait for the next batch over the whole step) per window of steps, as a figure,
    and overall; the step time, the images/s of the whole loop, the epochs started and the
    last loss. `bf16`: autocast to bfloat16 on `device`; `channels_last`: the batches too."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    it, waits, totals, images, epochs = iter(loader), [], [], 0, 1
    for step in range(warmup + steps):
        start = time.perf_counter()
        try:
            x, y = next(it)[:2]
        except StopIteration:  # a new epoch; its restart is part of what the loader costs
            it, epochs = iter(loader), epochs + 1
            x, y = next(it)[:2]
        got = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x.to(device, non_blocking=True).contiguous(memory_format=fmt)),
                           y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            waits.append(got - start)
            totals.append(time.perf_counter() - start)
            images += int(x.shape[0])
    del it
    cuts = [round(k * steps / windows) for k in range(windows + 1)]
    shares = [sum(waits[a:b]) / sum(totals[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
    return {
        "data_wait_share": {**figure(shares, unit="fraction"), "overall": round(sum(waits) / sum(totals), 4)},
        "step_s": figure(totals, unit="s"),
        "images_per_s": round(images / sum(totals), 2),
        "steps": steps,
        "epochs_started": epochs,
        "final_loss": round(float(loss.detach()), 4),
    }


def data_wait(shards_dir: str, loader_kwargs: dict, model_name: str, num_classes: int,
              steps: int, warmup: int, windows: int, device: str = "cpu") -> dict:
    """`train_steps` (fp32, contiguous) on a train loader made with `loader_kwargs` and a fresh
    `model_name` (seed 0)."""
    torch.manual_seed(0)
    loader = make_loader(shards_dir, split="train", **loader_kwargs)
    net = build_model(model_name, num_classes=num_classes).to(device).train()
    return train_steps(loader, net, device, steps, warmup, windows)
