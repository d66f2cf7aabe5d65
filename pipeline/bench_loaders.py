"""Timing batch sources side by side, interleaved, so that drift on a shared machine hits all.

A source is anything that hands out batches: a loader from `make_loader`, or a bare DALI
pipeline cut after some stage. Every source is built first; then, round after round, each
one is warmed up (its first batches after a switch are not timed) and timed for a window of
batches. The median over rounds is the figure, the rounds give its spread. Ratios between
sources are taken from the same rounds, so a noisy neighbour slows all of them alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pipeline.bench_stats import figure


@dataclass
class Source:
    """A named batch source: `next_batch()` returns (images in the batch, timed) where timed
    is False for a batch that started a new epoch (its wait includes the epoch restart)."""

    name: str
    next_batch: Callable[[], tuple[int, bool]]
    close: Callable[[], None] = lambda: None
    meta: dict = field(default_factory=dict)


def loader_source(name: str, loader: Any, meta: dict | None = None) -> Source:
    """Wrap an iterable loader (one epoch per `iter()`): epochs roll over without end."""
    state = {"it": iter(loader)}

    def next_batch() -> tuple[int, bool]:
        try:
            batch = next(state["it"])
            timed = True
        except StopIteration:
            state["it"] = iter(loader)
            batch = next(state["it"])
            timed = False
        return int(batch[0].shape[0]), timed

    def close() -> None:
        state["it"] = None

    return Source(name, next_batch, close, dict(meta or {}))


def pipeline_source(name: str, pipe: Any, batch_size: int, meta: dict | None = None) -> Source:
    """Wrap a built DALI pipeline: each `run()` is one batch."""
    def next_batch() -> tuple[int, bool]:
        pipe.run()
        return batch_size, True

    return Source(name, next_batch, lambda: None, dict(meta or {}))


def time_window(source: Source, warmup: int, window: int) -> float:
    """Images/s over `window` timed batches, after `warmup` untimed ones."""
    for _ in range(warmup):
        source.next_batch()
    images, seconds, done = 0, 0.0, 0
    while done < window:
        start = time.perf_counter()
        n, timed = source.next_batch()
        elapsed = time.perf_counter() - start
        if timed:
            images += n
            seconds += elapsed
            done += 1
    return images / seconds


def measure_interleaved(sources: Iterable[Source], warmup: int, window: int, repeats: int,
                        settle_s: float = 0.3, progress: Callable[[str], None] = print) -> dict[str, dict]:
    """{source name: figure}: `repeats` rounds, each timing every source once in turn.

    `settle_s` lets the source timed before finish its read-ahead before the next one starts,
    so that leftover background work is not billed to the wrong source.
    """
    sources = list(sources)
    runs: dict[str, list[float]] = {s.name: [] for s in sources}
    for r in range(repeats):
        for s in sources:
            time.sleep(settle_s)
            rate = time_window(s, warmup, window)
            runs[s.name].append(rate)
            progress(f"  round {r + 1}/{repeats}  {s.name:<34} {rate:8.1f} images/s")
    return {name: figure(values) for name, values in runs.items()}
