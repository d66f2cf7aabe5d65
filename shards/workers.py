"""The encoder processes: a small pool with one pipe per worker, whose deaths are noticed.

`multiprocessing.Pool` replaces a worker that dies (the OOM killer's SIGKILL, a segfault in
a decoder) but loses the task it held, so `Pool.imap` waits forever. Here the packer waits
on every worker's pipe and on its process sentinel together: a dead worker is noticed at
once, and `WorkerDied` names how it died and the files it held. Chunks of jobs go to the
workers in turn, `depth` chunks ahead per worker so none waits for the next, and results
come back in job order; a thread does the talking, so the workers are fed and their results
taken while the packer writes. Workers ignore SIGINT (the packer handles Ctrl-C) and get SIGKILL
when the packer dies, even by SIGKILL (no orphans keep encoding).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from multiprocessing.connection import Connection, wait


class WorkerDied(ChildProcessError):
    """An encoder process ended while it held jobs (killed, crashed); one line."""


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the packer died before the line above took effect
        os._exit(1)


def _serve(conn: Connection, fn: Callable, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    idle, t, cpu0 = 0.0, None, None  # seconds waiting for work after the first chunk (starved by the packer)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        if t is not None:
            idle += time.perf_counter() - t
        else:
            cpu0 = time.process_time()  # CPU from the first job on: the work, not the start-up
        results = [fn(job) for job in chunk]
        t = time.perf_counter()
        conn.send((results, idle, time.process_time() - cpu0))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its pipe"
    if code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGKILL:
            return "was killed by SIGKILL (the kernel's out-of-memory killer, or by hand)"
        return f"was killed by {sig.name}" + (" (a crash in a decoder)" if sig in (signal.SIGSEGV, signal.SIGBUS,
                                                                                 signal.SIGABRT) else "")
    return f"exited with code {code}"


class _Pump:
    """One `imap`: keeps every worker `depth` chunks ahead, gathers results by chunk number
    and records the first death (as the error the caller raises). While `backlog` chunks of
    results wait for the caller, no worker gets more, so memory stays bounded; the workers'
    results are still read, so the chunk the caller waits for always arrives."""

    def __init__(self, pool: EncoderPool, jobs: Iterator, chunksize: int, name: Callable, backlog: int) -> None:
        self.pool, self.jobs, self.chunksize, self.name, self.backlog = pool, jobs, chunksize, name, backlog
        self.cond = threading.Condition()
        self.done: dict[int, list] = {}
        self.error: BaseException | None = None
        self.finished = self.stop = self.exhausted = False
        self.pending: list[deque] = [deque() for _ in pool._procs]  # per worker: (chunk number, jobs) sent
        self.next = 0

    def feed(self, w: int) -> None:
        chunk = list(islice(self.jobs, self.chunksize))
        if not chunk:
            self.exhausted = True
            return
        self.pending[w].append((self.next, chunk))
        self.next += 1
        try:
            self.pool._conns[w].send(chunk)
        except OSError:  # its pipe is closed: it died
            self.pool._died(w, self.pending[w], self.name)

    def run(self) -> None:
        pool = self.pool
        n = len(pool._procs)
        hungry = [w for _ in range(pool.depth) for w in range(n)]  # a slot of `depth` per worker
        by_conn = {c: w for w, c in enumerate(pool._conns)}
        by_sentinel = {p.sentinel: w for w, p in enumerate(pool._procs)}
        try:
            while not self.stop:
                with self.cond:
                    room = not self.exhausted and len(self.done) < self.backlog
                while room and hungry and not self.exhausted:
                    self.feed(hungry.pop(0))
                if not any(self.pending):
                    if self.exhausted:
                        return
                    with self.cond:  # nothing in flight, jobs left: wait for the caller to catch up
                        while len(self.done) >= self.backlog and not self.stop:
                            self.cond.wait()
                    continue
                ready = wait([pool._conns[w] for w in range(n) if self.pending[w]] + list(by_sentinel))
                for obj in sorted(ready, key=lambda o: o in by_sentinel):  # read results before deaths
                    if obj not in by_conn:
                        w = by_sentinel[obj]
                        pool._died(w, self.pending[w], self.name)
                    w = by_conn[obj]
                    t0 = time.perf_counter()
                    try:
                        results, pool._idle[w], pool._cpu[w] = obj.recv()
                    except (EOFError, OSError):
                        pool._died(w, self.pending[w], self.name)
                    pool.recv_s += time.perf_counter() - t0
                    number, _ = self.pending[w].popleft()
                    hungry.append(w)
                    with self.cond:
                        self.done[number] = results
                        self.cond.notify_all()
        except BaseException as err:  # a death (WorkerDied), or anything else: the caller raises it
            with self.cond:
                self.error = err
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()


class EncoderPool:
    """`workers` processes running `fn` (a picklable top-level function) on jobs."""

    def __init__(self, workers: int, fn: Callable, depth: int = 3) -> None:
        ctx = mp.get_context("spawn")
        self.depth = depth
        self.wait_s = 0.0  # time the caller spent waiting for results (the workers were busy)
        self.recv_s = 0.0  # time spent receiving results (unpickling the bytes moved)
        self._procs, self._conns = [], []
        self._idle = [0.0] * workers  # per worker: seconds it waited for work (the packer fell behind)
        self._cpu = [0.0] * workers  # per worker: CPU seconds since its first job
        for i in range(workers):
            mine, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(theirs, fn, os.getpid()), name=f"shards-encoder-{i}",
                               daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(mine)

    @property
    def idle_s(self) -> float:
        """Seconds the workers together waited for work while jobs remained (starved)."""
        return sum(self._idle)

    @property
    def cpu_s(self) -> float:
        """CPU seconds the workers spent from their first job on (start-up left out)."""
        return sum(self._cpu)

    def imap(self, jobs: Iterable, chunksize: int = 8, name: Callable[[object], str] = str) -> Iterator:
        """fn(job) for each job of `jobs` (consumed lazily), in order. Raises WorkerDied when
        a worker ends; `name(job)` names the jobs it held.

        A thread of this process talks to the workers (sends chunks, receives results,
        watches the sentinels), so a worker is fed and its results taken while the caller
        writes: it never waits on the caller unless `backlog` chunks of results are waiting
        (the bound on the memory they take)."""
        # results may wait for the caller: enough to ride out a shard's fsync, bounded in memory
        pump = _Pump(self, iter(jobs), chunksize, name, backlog=max(32, 2 * self.depth * len(self._procs)))
        thread = threading.Thread(target=pump.run, name="shards-encoder-pump", daemon=True)
        thread.start()
        try:
            out = 0
            while True:
                t0 = time.perf_counter()
                with pump.cond:
                    while out not in pump.done and pump.error is None and not pump.finished:
                        pump.cond.wait()
                    results = pump.done.pop(out, None)
                    pump.cond.notify_all()
                    if results is None:
                        if pump.error is not None:
                            raise pump.error
                        return
                self.wait_s += time.perf_counter() - t0
                yield from results
                out += 1
        finally:
            with pump.cond:
                pump.stop = True
                pump.cond.notify_all()
            if pump.finished or pump.error is not None:
                thread.join()

    def _died(self, w: int, held: deque, name: Callable[[object], str]) -> None:
        proc = self._procs[w]
        proc.join(timeout=5)
        jobs = list(held[0][1]) if held else []  # the chunk it was working on
        after = f" or one of the {len(jobs) - 1} after it" if len(jobs) > 1 else ""
        what = f"while encoding {name(jobs[0])}{after}" if jobs else "while idle"
        raise WorkerDied(f"packer worker {proc.pid} {describe_exit(proc.exitcode)} {what}")

    def close(self) -> None:
        """Stop idle workers (after the last `imap`); `kill` stops busy ones at once."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker still running (after an error: nothing of theirs is needed)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()
        for conn in self._conns:
            conn.close()
