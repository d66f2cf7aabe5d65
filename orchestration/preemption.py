"""Preemption: a worker sent SIGTERM (what spot/preemptible VMs and Kubernetes send before
they take a node) finishes its step, every rank writes a step checkpoint, and the workers
exit; Ray Train then restarts the run from that checkpoint, losing at most one step.

- `install_preemption` runs in every training worker. A Ray worker's SIGTERM handler (installed by
  Ray in the main thread when its task loop starts; training runs in another thread, which
  may not install handlers) exits through `ray._private.worker.
  raise_sys_exit_with_custom_error_message`; it wraps that function, so the first
  SIGTERM records the request and leaves the process `GRACE_S` seconds to checkpoint; a
  second SIGTERM, or the end of the grace period, exits as Ray would. (A private Ray name:
  tests/test_orchestration_resume.py fails if a Ray upgrade moves it.)
- `StopAgreement.poll()` runs once per step on every rank: an all-reduce of "asked to stop"
  on a gloo group, started asynchronously at one step and read at the next, so the hot path
  never waits on it and all ranks decide to checkpoint at the same step.
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("train")

GRACE_S = 25.0  # Kubernetes' default terminationGracePeriodSeconds is 30
_requested = threading.Event()


class Preempted(RuntimeError):
    """Raised on every rank after the preemption checkpoint: Ray Train restarts the run from it."""


def install_preemption() -> None:
    """Called by every training worker before it trains (see the module docstring)."""
    import ray._private.worker as ray_worker

    if getattr(ray_worker, "_alexnet_preemption", False):
        return
    ray_exit = ray_worker.raise_sys_exit_with_custom_error_message

    def on_exit(message: str, exit_code: int = 1) -> None:
        if "SIGTERM" not in str(message) or _requested.is_set():
            ray_exit(message, exit_code)
            return
        _requested.set()  # the training thread checkpoints at its next step and stops
        timer = threading.Timer(GRACE_S, lambda: os._exit(exit_code))
        timer.daemon = True
        timer.start()

    ray_worker.raise_sys_exit_with_custom_error_message = on_exit
    ray_worker._alexnet_preemption = True


def requested() -> bool:
    return _requested.is_set()


class StopAgreement:
    """Whether any rank was asked to stop, agreed by all ranks one step later."""

    def __init__(self) -> None:
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")
        self._pending: tuple | None = None

    def poll(self) -> bool:
        flag = torch.tensor([1 if requested() else 0], dtype=torch.int32)
        if self.group is None:
            return bool(flag.item())
        agreed = False
        if self._pending is not None:
            work, previous = self._pending
            work.wait()
            agreed = bool(previous.item())
        self._pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return agreed
