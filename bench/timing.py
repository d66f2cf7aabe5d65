"""Timing batch sources side by side, interleaved, so that drift on a shared machine hits all.

A source is anything that hands out batches: a loader from `make_loader`, a bare DALI
pipeline cut after some stage, a decoder alone. Round after round, every source is opened
fresh (a new epoch: new DALI pipeline, new DataLoader workers), warmed up (its first batches
carry the start-up and the burst of its first parallel batches, and are not timed), timed
for a window of batches, and closed, so no read-ahead of one source runs on while the next
one is timed. The median over rounds is the figure, the rounds give its spread; ratios
between sources come from the same rounds, so a noisy neighbour slows all of them alike.
`time_passes` is the other way round: whole passes of one loader back to back, as training
runs them, to see what starting a pass costs and whether memory grows from pass to pass.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.figures import figure
from pipeline.usage import rss_mib


@dataclass
class Source:
    """A named batch source. `open()` starts a fresh run: an iterator of (images in the batch,
    timed), where timed is False for a batch that began a new epoch (it waited for the restart);
    closing the iterator stops the run and everything it started."""

    name: str
    open: Callable[[], Iterator[tuple[int, bool]]]
    warmup: int = 0  # extra untimed batches this source needs (e.g. one per DataLoader worker)
    meta: dict = field(default_factory=dict)


def loader_source(name: str, loader: Any, warmup: int = 0, meta: dict | None = None) -> Source:
    """Wrap a loader (one epoch per `iter()`); epochs roll over without end."""
    def run() -> Iterator[tuple[int, bool]]:
        while True:
            first = True
            for batch in loader:
                yield int(batch[0].shape[0]), not first
                first = False

    return Source(name, run, warmup, dict(meta or {}))


def pipeline_source(name: str, build: Callable[[], Any], batch_size: int, meta: dict | None = None) -> Source:
    """Wrap a DALI pipeline factory: each run builds one, each `run()` is one batch."""
    def run() -> Iterator[tuple[int, bool]]:
        pipe = build()
        try:
            while True:
                pipe.run()
                yield batch_size, True
        finally:
            del pipe

    return Source(name, run, 0, dict(meta or {}))


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its live descendants (the
    DataLoader workers), from /proc where there is one. Unlike wall time, this hardly moves
    when other jobs share the machine, so it gives each source's cost per image robustly."""
    total = time.process_time()
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return total
    parents, ticks = {}, {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    me, children = os.getpid(), set()
    frontier = {me}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - children
        children |= frontier
    return total + sum(ticks[pid] for pid in children) / os.sysconf("SC_CLK_TCK")


def time_window(batches: Iterator[tuple[int, bool]], warmup: int, window: int) -> tuple[float, float, float]:
    """(images/s over `window` timed batches after `warmup` untimed ones, seconds to the first
    batch, CPU milliseconds per image over the timed batches)."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(batches)
    images, seconds, done = 0, 0.0, 0
    cpu_start = cpu_seconds()
    while done < window:
        start = time.perf_counter()
        n, timed = next(batches)
        elapsed = time.perf_counter() - start
        if timed:
            images += n
            seconds += elapsed
            done += 1
    return images / seconds, first, (cpu_seconds() - cpu_start) * 1000 / images


def measure_interleaved(sources: Iterable[Source], warmup: int, window: int, repeats: int,
                        settle_s: float = 0.1, progress: Callable[[str], None] = print) -> dict[str, dict]:
    """{source name: {"images_per_s", "first_batch_s", "cpu_ms_per_image": figure}} over
    `repeats` rounds, each opening, timing and closing every source in turn."""
    sources = list(sources)
    runs: dict[str, dict[str, list[float]]] = {
        s.name: {"images_per_s": [], "first_batch_s": [], "cpu_ms_per_image": []} for s in sources}
    for r in range(repeats):
        for s in sources:
            time.sleep(settle_s)  # let the last source's processes and threads wind down
            batches = s.open()
            try:
                rate, first, cpu_ms = time_window(batches, max(1, warmup + s.warmup), window)
            finally:
                batches.close()
            for key, value in (("images_per_s", rate), ("first_batch_s", first), ("cpu_ms_per_image", cpu_ms)):
                runs[s.name][key].append(value)
            progress(f"  round {r + 1}/{repeats}  {s.name:<40} {rate:8.1f} images/s {cpu_ms:6.2f} CPU ms/image")
    units = {"images_per_s": "images/s", "first_batch_s": "s", "cpu_ms_per_image": "ms"}
    return {name: {key: figure(values, unit=units[key]) for key, values in r.items()} for name, r in runs.items()}


def time_passes(loader: Any, passes: int, sync: Callable[[], None] | None = None,
                after: Callable[[dict], None] | None = None) -> list[dict]:
    """Run `passes` whole passes (epochs) of a loader back to back, as a training loop does,
    and for each: seconds from the start of the pass (`iter()`: whatever the loader builds for
    a pass) to its first batch, seconds for the whole pass (after `sync()`, e.g. the CUDA
    device's), its batches and images, and the process's resident memory at its end.
    `after(entry)` is called at the end of each pass (to add what else to record, or print)."""
    out = []
    for _ in range(passes):
        start = time.perf_counter()
        first, batches, images = None, 0, 0
        for batch in loader:
            if first is None:
                first = time.perf_counter() - start
            batches += 1
            images += int(batch[0].shape[0])
        if sync is not None:
            sync()
        if first is None:
            raise ValueError("time_passes: the loader yielded no batch in a pass")
        out.append({"first_batch_s": first, "pass_s": time.perf_counter() - start, "batches": batches,
                    "images": images, "rss_mib": rss_mib()})
        if after is not None:
            after(out[-1])
    return out
