"""The encoder processes: a small pool with one pipe per worker, whose deaths are noticed.

`multiprocessing.Pool` replaces a worker that dies (the OOM killer's SIGKILL, a segfault in
a decoder) but loses the task it held, so `Pool.imap` waits forever. Here the packer waits
on every worker's pipe and on its process sentinel together: a dead worker is noticed at
once, and `WorkerDied` names how it died and the files it held. Chunks of jobs go to the
workers in turn, `depth` chunks ahead per worker so none waits for the next, and results
come back in job order. Workers ignore SIGINT (the packer handles Ctrl-C) and get SIGKILL
when the packer dies, even by SIGKILL (no orphans keep encoding).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import deque
from itertools import islice
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterable, Iterator


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
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        conn.send([fn(job) for job in chunk])


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


class EncoderPool:
    """`workers` processes running `fn` (a picklable top-level function) on jobs."""

    def __init__(self, workers: int, fn: Callable, depth: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.depth = depth
        self.wait_s = 0.0  # time the caller spent waiting for results (the workers were busy)
        self.recv_s = 0.0  # time spent receiving results (unpickling the bytes moved)
        self._procs, self._conns = [], []
        for i in range(workers):
            mine, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(theirs, fn, os.getpid()), name=f"shards-encoder-{i}",
                               daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(mine)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def imap(self, jobs: Iterable, chunksize: int = 8, name: Callable[[object], str] = str) -> Iterator:
        """fn(job) for each job of `jobs` (consumed lazily), in order. Raises WorkerDied when
        a worker ends; `name(job)` names the jobs it held."""
        jobs = iter(jobs)
        n = len(self._procs)
        pending: list[deque] = [deque() for _ in range(n)]  # per worker: (chunk number, jobs) sent, in order
        done: dict[int, list] = {}
        counter = {"next": 0}

        def feed(w: int) -> None:
            chunk = list(islice(jobs, chunksize))
            if chunk:
                pending[w].append((counter["next"], chunk))
                try:
                    self._conns[w].send(chunk)
                except OSError:  # its pipe is closed: it died
                    self._died(w, pending[w], name)
                counter["next"] += 1

        for _ in range(self.depth):
            for w in range(n):
                feed(w)
        out = 0
        by_conn = {c: w for w, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: w for w, p in enumerate(self._procs)}
        while True:
            while out in done:
                yield from done.pop(out)
                out += 1
            if not any(pending):
                return
            t0 = time.perf_counter()
            ready = wait([self._conns[w] for w in range(n) if pending[w]] + list(by_sentinel))
            self.wait_s += time.perf_counter() - t0
            for obj in sorted(ready, key=lambda o: o in by_sentinel):  # read results before deaths
                if obj in by_conn:
                    w = by_conn[obj]
                    t0 = time.perf_counter()
                    try:
                        results = obj.recv()
                    except (EOFError, OSError):
                        self._died(w, pending[w], name)
                    self.recv_s += time.perf_counter() - t0
                    number, _ = pending[w].popleft()
                    done[number] = results
                    feed(w)
                else:
                    self._died(by_sentinel[obj], pending[by_sentinel[obj]], name)

    def _died(self, w: int, held: deque, name: Callable[[object], str]) -> None:
        proc = self._procs[w]
        proc.join(timeout=5)
        jobs = list(held[0][1]) if held else []  # the chunk it was working on
        what = (f"while encoding {name(jobs[0])}" + (f" or one of the {len(jobs) - 1} after it" if len(jobs) > 1 else "")
                if jobs else "while idle")
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
