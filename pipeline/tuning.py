"""Self-tuned decoding: the make_loader extras `num_threads="auto"` and `hw_decoder_load="auto"`.

Before its first pass, a DALI loader with an "auto" setting times its own graph (train or
val, as built for the pass) on its own part of the shards for each candidate setting, a few
batches each, all within `BUDGET_S` seconds, and keeps the fastest. The two are tuned one
after the other: first the mixed decoder's hardware share (GPU graphs only; DALI's default,
0.65, leaves a third of the images to CPU Huffman decoding) at the most threads, then the
thread count at that share. A thread count within `CLOSE` of the fastest wins if it is
smaller: the cores it leaves go to the trainer and the other ranks of the node.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.builder import build_pipeline
from pipeline.spec import LoaderSpec

log = logging.getLogger(__name__)

BUDGET_S = 8.0  # the whole probe, pipeline builds included; at least one probe runs whatever it costs
HW_LOADS = (0.5, 0.75, 0.9, 1.0)
WARMUP_BATCHES = 2  # untimed: the first batches carry the decoder's start and the reader's fill
TIMED_BATCHES = 4
MAX_BATCHES = 64
CLOSE = 0.03
MAX_THREADS = 16


@dataclass(frozen=True)
class Probe:
    num_threads: int
    hw_decoder_load: float | None
    images_per_s: float
    batches: int


def thread_cap(device: str) -> int:
    """The most DALI threads worth trying: the usable cores, shared with the node's other GPUs'
    ranks on a GPU worker (under Ray Train every worker of a node sees all its GPUs)."""
    cores = len(os.sched_getaffinity(0))
    if device == "cuda":
        import torch

        cores //= max(1, torch.cuda.device_count())
    return max(1, min(MAX_THREADS, cores))


def thread_candidates(cap: int) -> list[int]:
    """1, 2, 4, ... up to `cap`, and `cap` itself; most first (the likeliest fastest is timed
    before the budget can run out)."""
    out, n = {cap}, 1
    while n < cap:
        out.add(n)
        n *= 2
    return sorted(out, reverse=True)


def tune(spec: LoaderSpec, budget_s: float | None = None,
         clock: Callable[[], float] = time.perf_counter) -> tuple[LoaderSpec, dict | None]:
    """The spec with its "auto" settings chosen, and the report (probes, choice, seconds),
    or None where nothing could be probed (an empty part, or tars not yet checked for corrupt
    images: probing one could crash the process). Logged in one line. `clock`: the time the
    budget is counted in (seconds, monotonic)."""
    todo = set(spec.auto)
    chosen = replace(spec, auto=())
    parts = [i for i, _, _ in spec.part_files(spec.epoch)]
    if not parts or spec.num_batches == 0:
        return chosen, None
    if spec.data.unverified(parts):
        log.warning("rank %d: DALI auto-tuning skipped: tars of %s differ from shards.parquet; using "
                    "num_threads %d, hw_decoder_load %s", spec.rank, spec.data.uri, chosen.num_threads,
                    chosen.hw_decoder_load)
        return chosen, None
    spec.stage(spec.epoch)
    with tempfile.TemporaryDirectory(prefix="alexnet-tune-") as part_dir:  # the probes' part indexes
        return _tune(spec, chosen, todo, Path(part_dir), BUDGET_S if budget_s is None else budget_s, clock)


def _tune(spec: LoaderSpec, chosen: LoaderSpec, todo: set[str], part_dir: Path, budget_s: float,
          clock: Callable[[], float]) -> tuple[LoaderSpec, dict]:
    start = clock()
    deadline = start + budget_s
    probes: list[Probe] = []

    threads = thread_cap(spec.device) if "num_threads" in todo else spec.num_threads
    expected = (len(HW_LOADS) if "hw_decoder_load" in todo else 0) + \
        (len(thread_candidates(threads)) if "num_threads" in todo else 0)
    timed_s = 0.6 * budget_s / max(1, expected)  # each probe's timed share; the rest builds and warms up

    def measure(threads: int, load: float | None) -> None:
        if probes and clock() >= deadline:
            return
        probes.append(_probe(replace(chosen, num_threads=threads, hw_decoder_load=load), part_dir,
                             timed_s, deadline, clock))

    load = spec.hw_decoder_load
    if "hw_decoder_load" in todo:
        for candidate in HW_LOADS:
            measure(threads, candidate)
        load = max(probes, key=lambda p: p.images_per_s).hw_decoder_load
    if "num_threads" in todo:
        for candidate in thread_candidates(threads):
            if not any(p.num_threads == candidate and p.hw_decoder_load == load for p in probes):
                measure(candidate, load)
        at_load = [p for p in probes if p.hw_decoder_load == load]
        fastest = max(p.images_per_s for p in at_load)
        threads = min(p.num_threads for p in at_load if p.images_per_s >= (1 - CLOSE) * fastest)
    best = next(p for p in probes if p.num_threads == threads and p.hw_decoder_load == load)
    report = {"tuned": sorted(todo), "chosen": {"num_threads": threads, "hw_decoder_load": load,
                                                "images_per_s": round(best.images_per_s, 1)},
              "probes": [asdict(p) for p in probes], "seconds": round(clock() - start, 2),
              "budget_s": budget_s}
    log.info("rank %d: DALI %s", spec.rank, describe(report))
    return replace(chosen, num_threads=threads, hw_decoder_load=load), report


def _probe(spec: LoaderSpec, part_dir: Path, timed_s: float, deadline: float, clock: Callable[[], float]) -> Probe:
    """Images/s of `spec`'s pipeline for its first epoch, after a warm-up: at least
    TIMED_BATCHES batches and `timed_s` seconds, less where `deadline` comes first (one batch
    at least) or the part runs out."""
    pipe = build_pipeline(spec, spec.epoch, part_dir)
    timed, t0 = 0, None
    try:
        for _ in range(WARMUP_BATCHES):
            pipe.run()
        t0 = clock()
        while True:
            pipe.run()
            timed += 1
            now = clock()
            if now >= deadline or (timed >= TIMED_BATCHES and now - t0 >= timed_s) or timed >= MAX_BATCHES:
                break
    except StopIteration:  # a part shorter than the probe: what was timed counts
        pass
    elapsed = clock() - t0 if t0 is not None and timed else 0.0
    del pipe
    rate = timed * spec.batch_size / elapsed if elapsed > 0 else 0.0
    return Probe(spec.num_threads, spec.hw_decoder_load, rate, timed)


def describe(report: dict) -> str:
    """One line: what was tuned, the choice and its images/s, every probe, the time it took."""
    c = report["chosen"]
    probes = ", ".join(f"{p['num_threads']}t/{p['hw_decoder_load']}: {p['images_per_s']:.0f}" for p in report["probes"])
    return (f"auto-tuned {'/'.join(report['tuned'])} in {report['seconds']:.1f} s (budget {report['budget_s']:.0f} s): "
            f"num_threads {c['num_threads']}, hw_decoder_load {c['hw_decoder_load']} -> {c['images_per_s']:.0f} "
            f"images/s (probed threads/load: {probes})")
