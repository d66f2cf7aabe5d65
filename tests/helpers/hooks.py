"""Callbacks the e2e drills pass into a run besides tests/helpers/faults.py's failures
(`train.main(argv, callbacks=[...])`, or tests/helpers/driver.py for a driver run as a
script): each runs on every rank after each checkpoint is reported.

- `HoldWhileShrunk`: a worker group smaller than the run's largest waits after its first
  checkpoint until Ray Train replaces it, so an elastic drill sees the group grow back
  whatever the speed of the training (a short run would otherwise end before Ray's next
  resize check).
- `SignalAt`: one rank sends itself a signal right after the checkpoint at global `step`
  (SIGTERM: a spot VM's notice) and returns once the worker has taken note of it, so the
  ranks agree to stop at a known step.
- `FillDisk`: once the checkpoint at the end of `epoch` is registered, another job's file
  takes the disk down to `leave` times that checkpoint's size, so the next checkpoint does
  not fit (the full-disk drill), whatever the size of a checkpoint.

Pickled by value to the Ray workers, as faults.py is.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

from orchestration.resume import Position, wait_until_registered


@dataclass(frozen=True)
class HoldWhileShrunk:
    world_size: int = 2  # the run's largest group
    timeout_s: float = 600.0

    def after_checkpoint(self, pos: Position, resumed: Position) -> None:
        import ray.train

        if ray.train.get_context().get_world_size() >= self.world_size:
            return
        wait_until_registered()  # the resize restarts from this checkpoint
        print(f"held after the checkpoint at step {pos.step} until Ray Train resizes the group", flush=True)
        time.sleep(self.timeout_s)  # Ray Train stops this worker group when it resizes


@dataclass(frozen=True)
class SignalAt:
    step: int
    sig: int = signal.SIGTERM
    rank: int = 1
    timeout_s: float = 60.0

    def after_checkpoint(self, pos: Position, resumed: Position) -> None:
        import ray.train

        from orchestration import preemption

        if pos.step != self.step or resumed.step >= self.step or ray.train.get_context().get_world_rank() != self.rank:
            return
        os.kill(os.getpid(), self.sig)
        deadline = time.monotonic() + self.timeout_s  # Ray's handler runs in the worker's main thread
        while self.sig == signal.SIGTERM and not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.01)


@dataclass(frozen=True)
class FillDisk:
    run_dir: str  # where the checkpoints go (a local path)
    filler: str  # the other job's file, on the same disk
    epoch: int = 1
    leave: float = 0.5

    def after_checkpoint(self, pos: Position, resumed: Position) -> None:
        import ray.train

        from orchestration.checkpoint import FILE, dir_name

        if not (pos.epoch == self.epoch and pos.epoch_step == 0 and resumed.epoch < self.epoch):
            return
        if ray.train.get_context().get_world_rank() != 0:
            return
        wait_until_registered()
        size = os.path.getsize(os.path.join(self.run_dir, dir_name(self.epoch), FILE))
        folder = os.path.dirname(self.filler)
        os.makedirs(folder, exist_ok=True)
        take = shutil.disk_usage(folder).free - int(self.leave * size)
        with open(self.filler, "wb") as f:
            f.truncate(0)
            block = b"\x5a" * 2**20
            while take > 0:
                take -= f.write(block[:min(len(block), take)])
            f.flush()
            os.fsync(f.fileno())


def _ship_by_value() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
