"""Where a loader's time and memory go while it runs, for the training metrics rows.

- `DaliThreads.utilisation()`: the CPU time DALI's CPU worker pool (the `num_threads` threads
  the executor runs CPU operators on) spent since the last call, over wall time x
  `num_threads`: near 1, the CPU side (decoding, augmenting) is the limit; low, the threads
  wait (on the GPU stage, the reader, or the consumer). On a GPU graph the `mixed` decoder
  runs its own pool of `num_threads` more threads (nvJPEG's CPU Huffman decoding):
  `mixed_utilisation()` reads that one apart over the same wall time x `num_threads`, so
  neither share can pass 1 (counted together they read up to 2). Read from /proc (Linux);
  None elsewhere. Threads of a pipeline torn down inside the window are not counted (their
  time is gone with them), so the window that holds an epoch's rebuild reads a little low.
- `memory_mb(device)`: the process's resident memory, anonymous and file-backed apart (DALI
  maps the tars it reads, which a single RSS figure counts as if it were a leak), and, on a
  GPU, the device memory in use outside torch's allocator (DALI's pools, the CUDA context).
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

# DALI names its pool threads "[DALI][TP<i>]<pool>" ("[DALI][NT<i>]<pool>" with
# DALI_USE_NEW_THREAD_POOL=1); Linux keeps the first 15 bytes of a thread's name, so the pool's
# name shows cut: "[DALI][TP0]Exec", "[DALI][TP12]Mix". The executor's CPU worker pool (seen on
# DALI 2.4: "[DALI][TP<i>]Exec...") and the mixed decoder's own pool (DALI's imgcodec decoder
# names it "MixedDecoder") are told apart by what is left of that name. DALI's executor
# ("[DALI] Executor") and the reader's prefetch ("PrefetchWorker") threads are in neither.
_POOL_THREAD = re.compile(r"\[DALI\]\[(?:TP|NT)\d+\](.+)")
WORKER_POOL = "Executor"  # the name's start is what /proc shows
MIXED_POOL = "MixedDecoder"
_TASKS = Path("/proc/self/task")


def pool_of(comm: str) -> str | None:
    """"worker" (DALI's CPU worker pool), "mixed" (the mixed decoder's pool) or None (any other
    thread, or a pool name cut too short to tell) for a thread name as /proc shows it."""
    m = _POOL_THREAD.match(comm.strip())
    if not m:
        return None
    rest = m.group(1)
    return "worker" if WORKER_POOL.startswith(rest) else "mixed" if MIXED_POOL.startswith(rest) else None


class DaliThreads:
    """CPU use of this process's DALI CPU worker pool, as a share of `num_threads` cores (and
    of the mixed decoder's pool apart, on GPU graphs)."""

    def __init__(self, num_threads: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.num_threads = max(1, int(num_threads))
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._clock = clock  # wall seconds
        self._last_wall, self._last = clock(), self._cpu_by_thread()
        self._mixed: float | None = None

    def _cpu_by_thread(self) -> dict[str, tuple[str, float]] | None:
        """thread id -> (pool, CPU seconds) of each DALI pool thread; None without /proc."""
        if not _TASKS.is_dir():
            return None
        out = {}
        for task in _TASKS.iterdir():
            try:
                pool = pool_of((task / "comm").read_text())
                if pool is None:
                    continue
                out[task.name] = (pool, _thread_cpu_s(task, self._tick))
            except OSError:  # the thread ended while being read
                continue
        return out

    def utilisation(self) -> float | None:
        """The CPU worker pool's CPU seconds since the last call over wall seconds x
        num_threads (`mixed_utilisation()` then holds the mixed decoder pool's, same window)."""
        now, cpu = self._clock(), self._cpu_by_thread()
        if cpu is None or self._last is None:
            return None
        used = {"worker": 0.0, "mixed": 0.0}
        for tid, (pool, t) in cpu.items():
            before = self._last.get(tid)
            used[pool] += t - (before[1] if before and before[0] == pool else 0.0)  # a reused id: a new thread
        wall = now - self._last_wall
        self._last_wall, self._last = now, cpu
        if wall <= 0:
            self._mixed = None
            return None
        share = {pool: s / (wall * self.num_threads) for pool, s in used.items()}
        self._mixed = share["mixed"] if any(p == "mixed" for p, _ in cpu.values()) else None
        return share["worker"]

    def mixed_utilisation(self) -> float | None:
        """The mixed decoder pool's share over the window of the last `utilisation()` call;
        None where no mixed decoder runs (CPU graphs) or nothing was read."""
        return self._mixed


def _thread_cpu_s(task: Path, tick: int) -> float:
    """A thread's CPU seconds: schedstat's nanoseconds where the kernel has it, else stat's
    utime + stime in clock ticks (1/100 s: coarse for short windows)."""
    sched = task / "schedstat"
    if sched.is_file():
        return int(sched.read_text().split()[0]) / 1e9
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def _status_kib(*fields: str) -> dict[str, int] | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    out = {}
    for line in status.read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = int(value.split()[0])
    return out


def rss_mib() -> float | None:
    """This process's resident memory now (VmRSS of /proc/self/status), MiB; None without /proc."""
    kib = _status_kib("VmRSS")
    return round(kib["VmRSS"] / 1024, 1) if kib and "VmRSS" in kib else None


def resident_split_mib() -> tuple[float | None, float | None]:
    """(anonymous, file-backed) resident memory of this process now, MiB (/proc/self/status).

    Anonymous is RssAnon + RssShmem: heap, pools, pinned buffers, shared memory, which only
    freeing returns, and which grows with a leak. File-backed is RssFile: pages of mapped
    files, here mostly the tars DALI maps whole while it reads them; it ramps by the bytes a
    pass reads and drops when the pass ends, and the kernel may drop it under pressure. VmRSS
    (their sum) therefore looks like a leak every epoch (issue 23). None without /proc."""
    kib = _status_kib("RssAnon", "RssFile", "RssShmem")
    if not kib or "RssAnon" not in kib:
        return None, None
    return round((kib["RssAnon"] + kib.get("RssShmem", 0)) / 1024, 1), round(kib.get("RssFile", 0) / 1024, 1)


def memory_mb(device: torch.device) -> dict[str, float | None]:
    """This process's memory in MB: `mem_anon_mb` and `mem_file_mb` (resident, anonymous and
    file-backed: `resident_split_mib`) and `dali_device_mb`, the device memory in use outside
    torch's allocator (DALI's pools, the CUDA context; None on the CPU)."""
    anon, file = resident_split_mib()
    out = {"mem_anon_mb": anon, "mem_file_mb": file, "dali_device_mb": None}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["dali_device_mb"] = (total - free - torch.cuda.memory_reserved(device)) / 2**20
    return out
