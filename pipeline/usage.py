"""Where a loader's time and memory go while it runs, for the training metrics rows.

- `DaliThreads.utilisation()`: the CPU time DALI's worker threads (the pool named
  `[DALI][TP<n>]...`) spent since the last call, over wall time x `num_threads`: near 1, the
  CPU side (decoding, augmenting) is the limit; low, the threads wait (on the GPU stage, the
  reader, or the consumer). Read from /proc (Linux); None elsewhere. Threads of a pipeline
  torn down inside the window are not counted (their time is gone with them), so the window
  that holds an epoch's rebuild reads a little low.
- `memory_mb(device)`: the process's resident memory and, on a GPU, the device memory in use
  outside torch's allocator (DALI's pools, the CUDA context): what the pipeline holds there.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

POOL_PREFIX = "[DALI][TP"  # DALI's thread-pool threads; its executor and prefetch threads are not counted
_TASKS = Path("/proc/self/task")


class DaliThreads:
    """CPU use of this process's DALI pool threads, as a share of `num_threads` cores."""

    def __init__(self, num_threads: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.num_threads = max(1, int(num_threads))
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._clock = clock  # wall seconds
        self._last_wall, self._last = clock(), self._cpu_by_thread()

    def _cpu_by_thread(self) -> dict[str, float] | None:
        if not _TASKS.is_dir():
            return None
        out = {}
        for task in _TASKS.iterdir():
            try:
                if not (task / "comm").read_text().startswith(POOL_PREFIX):
                    continue
                out[task.name] = _thread_cpu_s(task, self._tick)
            except OSError:  # the thread ended while being read
                continue
        return out

    def utilisation(self) -> float | None:
        """The pool's CPU seconds since the last call over wall seconds x num_threads."""
        now, cpu = self._clock(), self._cpu_by_thread()
        if cpu is None or self._last is None:
            return None
        used = sum(t - self._last.get(tid, 0.0) for tid, t in cpu.items())
        wall = now - self._last_wall
        self._last_wall, self._last = now, cpu
        return used / (wall * self.num_threads) if wall > 0 else None


def _thread_cpu_s(task: Path, tick: int) -> float:
    """A thread's CPU seconds: schedstat's nanoseconds where the kernel has it, else stat's
    utime + stime in clock ticks (1/100 s: coarse for short windows)."""
    sched = task / "schedstat"
    if sched.is_file():
        return int(sched.read_text().split()[0]) / 1e9
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def rss_mib() -> float | None:
    """This process's resident memory now (VmRSS of /proc/self/status), MiB; None without /proc."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next((ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


def memory_mb(device: torch.device) -> tuple[float | None, float | None]:
    """(resident memory of this process, device memory in use outside torch's allocator) in MB;
    the second is None on the CPU."""
    rss = rss_mib()
    if device.type != "cuda":
        return rss, None
    free, total = torch.cuda.mem_get_info(device)
    return rss, (total - free - torch.cuda.memory_reserved(device)) / 2**20
