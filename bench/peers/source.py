"""A `bench.timing.Source` whose loader runs in a child process (`bench.peers.child serve`):
every peer runs the same way, each in its own side environment, and is timed in the bench's
interleaved rounds like any other source. The child is started once and kept; each round opens
a fresh pass in it. The bench's CPU counter already takes in the process tree (the child and
its DataLoader workers); after each timed window, before the pass closes, the tree's peak
resident memory is read: the sum of each process's VmHWM (the child's peak and its workers'),
as a user's `top` would add them up (shared pages counted once per process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.timing import Source


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - set(out)
        out += sorted(frontier)
    return out


def status_mib(pid: int, field: str) -> float:
    """VmHWM / VmRSS of a process in MiB (0 where it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_peak_mib(root: int) -> float:
    return round(sum(status_mib(pid, "VmHWM") for pid in tree_pids(root)), 1)


class ChildLoader:
    """One loader in its own process. `source()` is the bench's view of it; `peak_rss_mib` the
    highest tree peak seen after a timed window; `close()` ends the process."""

    def __init__(self, name: str, spec: dict, pythonpath: str, log: Path) -> None:
        self.name, self.spec, self.pythonpath, self.log = name, spec, pythonpath, Path(log)
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self.peak_rss_mib = 0.0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": self.pythonpath}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.peers.child", "serve", json.dumps(self.spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("ab"),
                                     text=True, env=env, bufsize=1)
        self.ready = self._read()

    def _ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.is_file() else ""
            raise RuntimeError(f"peer {self.name}: its process ended (exit {self.proc.poll()}); "
                               f"log {self.log}:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer {self.name}: {reply['error']}")
        return reply

    def batches(self) -> Iterator[tuple[int, bool]]:
        if self.proc is None:
            self.start()
        self._ask("open")
        try:
            while True:
                reply = self._ask("next")
                yield reply["n"], reply["timed"]
        finally:
            # the window is over: the tree is at its fullest now, before the pass closes
            self.peak_rss_mib = max(self.peak_rss_mib, tree_peak_mib(self.proc.pid))
            self._ask("close")

    def source(self, warmup: int, meta: dict) -> Source:
        return Source(self.name, self.batches, warmup, meta)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None
