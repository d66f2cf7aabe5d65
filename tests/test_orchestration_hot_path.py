"""The training step's hot path: `data_wait` is the time blocked waiting for the next batch
and nothing else, and on a GPU no step but a logged one synchronises the host with the
device. `train_one_epoch` is run directly (no Ray) on a real model and real tensors; the
loader is a list of batches behind a wrapper that stalls a known time before each one.

The loop reads its times from `Ctx.clock`; here that is a clock the test advances itself (the
loader's stall moves it, and so does every other reading by a fixed tick), so the figures are
exact and no assertion depends on how fast this machine runs."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from orchestration.compute import grad_scaler
from orchestration.config import from_dict
from orchestration.resume import Position
from orchestration.schedule import LrSchedule
from orchestration.train import Ctx, make_optimizer, train_one_epoch

BATCH, STEPS, STALL_S = 8, 12, 0.05


class FakeClock:
    """Seconds that pass only when the test says: each reading moves on by `tick` (the step's
    compute), and `stall()` by what a slow loader costs."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def stall(self, seconds: float) -> None:
        self.now += seconds


class SlowLoader:
    """`STEPS` fixed batches; each `next()` first stalls `stall_s` (a loader that is that slow):
    on a FakeClock when given one, else by sleeping."""

    def __init__(self, stall_s: float, device: torch.device, clock: FakeClock | None = None) -> None:
        self.clock = clock
        gen = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(BATCH, 3, 32, 32, generator=gen).to(device),
                         torch.randint(0, 10, (BATCH,), generator=gen).to(device),
                         [f"k{i}-{j}" for j in range(BATCH)]) for i in range(STEPS)]
        self.stall_s, self.handed = stall_s, 0

    def __len__(self) -> int:
        return STEPS

    def __iter__(self):
        self.handed = 0
        for batch in self.batches:
            if self.clock is not None:
                self.clock.stall(self.stall_s)
            else:
                time.sleep(self.stall_s)
            self.handed += 1
            yield batch


class NoCheckpoints:
    stopping = False

    def after_step(self, *args) -> None:
        pass


def run_epoch(loader, device: torch.device, log_every: int, arm=lambda: None, precision: str = "fp32",
              model: nn.Module | None = None) -> dict:
    """One epoch of a small conv net; `arm()` runs after the set-up, right before the loop."""
    cfg = from_dict({"name": "t", "storage_path": "/tmp/r", "shards_dir": "/tmp/s", "model": "alexnet-bn",
                     "epochs": 1, "batch_size": BATCH, "workers": 1, "use_gpu": device.type == "cuda",
                     "log_every": log_every, "lr": 0.01, "precision": precision})
    torch.manual_seed(0)
    model = model or small_net().to(device)
    optimizer = make_optimizer(cfg, model)
    schedule = LrSchedule(cfg, optimizer, BATCH, STEPS * BATCH)
    ctx = Ctx(cfg, device, rank=0, world_size=1, log_rows=None,
              clock=loader.clock if getattr(loader, "clock", None) is not None else time.perf_counter,
              scaler=grad_scaler(cfg, device))
    arm()
    return train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, schedule, 1, Position(), ctx,
                           NoCheckpoints())


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_on_cpu_is_what_the_config_says(precision, dtype):
    """bf16 on a CPU worker autocasts the forward (it used to be fp32 without a word); the
    weights the optimizer steps stay fp32. (fp16 on CPU is refused by the config.)"""
    device, model, seen = torch.device("cpu"), small_net(), []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = model[0].weight.detach().clone()
    figures = run_epoch(SlowLoader(0.0, device, FakeClock(0.001)), device, log_every=4, precision=precision,
                        model=model)
    assert set(seen) == {dtype} and len(seen) == STEPS
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)
    assert figures["loss"] > 0


def test_data_wait_is_the_time_blocked_on_the_loader():
    """A loader that stalls 50 ms per batch, on a clock where each reading costs 1 ms. Per step
    the loop reads the clock before and after `next()` (the wait: the stall + 1 tick) and once
    after the step (its time: the stall + 2 ticks), so the share is exactly (stall + tick) /
    (stall + 2 ticks), and a loader that never stalls waits half of each step (its one tick)."""
    device = torch.device("cpu")
    tick = 0.001
    figures = run_epoch(SlowLoader(STALL_S, device, FakeClock(tick)), device, log_every=4)
    step_s = STALL_S + 2 * tick
    assert figures["data_wait"] == pytest.approx((STALL_S + tick) / step_s, rel=1e-9)
    assert figures["images_per_s"] == pytest.approx(BATCH / step_s, rel=1e-9)
    fast = run_epoch(SlowLoader(0.0, device, FakeClock(tick)), device, log_every=4)
    assert fast["data_wait"] == pytest.approx(0.5, rel=1e-9)
    assert fast["loss"] > 0


@pytest.mark.gpu
def test_no_host_sync_on_steps_that_are_not_logged():
    """With CUDA's sync debug mode set to error, the first operation that blocks the host on
    the device raises: that must be the read-back of the only logged step, the last one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    loader = SlowLoader(0.0, device)
    run_epoch(loader, device, log_every=STEPS)  # warm-up: cuDNN plans, allocator
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            run_epoch(loader, device, log_every=STEPS, arm=lambda: torch.cuda.set_sync_debug_mode("error"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loader.handed == STEPS, f"a host sync in step {loader.handed}, which is not a log step"
