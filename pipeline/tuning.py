"""Self-tuned decoding: the make_loader extras `num_threads="auto"` and `hw_decoder_load="auto"`.

Before its first pass, a DALI loader with an "auto" setting times its own graph (train or
val, as built for the pass) on its own part of the shards for each candidate setting, a few
batches each, all within `BUDGET_S` seconds, and keeps the fastest. The two are tuned one
after the other: first the mixed decoder's hardware share (GPU graphs only; DALI's default,
0.65, leaves a third of the images to CPU Huffman decoding) at the most threads, then the
thread count at that share. A thread count within `CLOSE` of the fastest wins if it is
smaller: the cores it leaves go to the trainer and the other ranks of the node.

The hardware share is only worth choosing where the hardware JPEG decoder does the work: the
mixed decoder falls back silently (through nvJPEG's CUDA path down to the CPU) where it is
missing or unusable (no NVJPG engine, a container without the driver's video capability),
and every share then decodes alike. So shares 1.0 and the lowest are probed first, NVML's
NVJPG utilisation is read while share 1.0 runs, and `hardware_verdict` says whether the
hardware decoder was used; where it was not, or where the two shares' rates agree within
their noise, the choice keeps DALI's default share (None) instead of picking among equal
rates. The report's `hardware_decoder` ("used" / "not used"; None where the share was not
tuned or nothing could decide) and `hardware_decoder_evidence` say which and why.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.builder import build_pipeline
from pipeline.spec import LoaderSpec

log = logging.getLogger(__name__)

BUDGET_S = 8.0  # the whole probe, pipeline builds included; at least one probe runs whatever it costs
HW_LOADS = (0.5, 0.75, 0.9, 1.0)
# probing order: first the two shares `hardware_verdict` compares (1.0, the lowest): the budget may cut the rest
HW_ORDER = (HW_LOADS[-1], HW_LOADS[0], *HW_LOADS[1:-1])
NOISE_K = 2.0  # rates "agree" within NOISE_K standard errors of their difference (about 95% for normal noise)
# the least the probe at share 1.0 is timed where NVML reads NVJPG (past MAX_BATCHES, and
# round the part again where it is shorter): NVML reports the busy share of its last sampling
# period (1/6 s to 1 s, by GPU), so a shorter probe could end before a period covering it did,
# and read 0 from a decoder that worked
NVJPG_MIN_S = 1.5
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
    noise: float | None = None  # images/s: the standard error of images_per_s (`rate_noise`); None under 2 batches


def rate_noise(images_per_s: float, batch_s: Sequence[float]) -> float | None:
    """The standard error of a probe's rate, from its timed batches' seconds: the rate is
    batch / mean(batch_s), so (delta method) its standard error is rate x (std / mean of
    batch_s) / sqrt(n). It counts how much the batches of one probe scatter (the decoder's
    and reader's jitter, other processes); drift between probes is not in it. None under 2
    batches (no spread to measure)."""
    n = len(batch_s)
    if n < 2:
        return None
    mean = sum(batch_s) / n
    if mean <= 0:
        return None
    std = math.sqrt(sum((t - mean) ** 2 for t in batch_s) / (n - 1))
    return images_per_s * std / mean / math.sqrt(n)


def hardware_verdict(probes: Sequence[Probe], nvjpg_util: Sequence[float]) -> dict:
    """Whether the mixed decoder's hardware JPEG decoder did the work, from the hardware-share
    probes (at one thread count) and NVML's NVJPG utilisation (0..1) read while share 1.0 ran
    (empty: not measured: no NVML, no NVJPG engine, or no reading).

    - measured, and 0 in every reading: "not used" (the hardware decoder sat idle with every
      image sent to it);
    - measured, above 0: "used" (the evidence: mean and max utilisation); when the rates at
      1.0 and at the lowest share agree within noise, the share makes no difference here and
      DALI's default is kept;
    - not measured: the rates at 1.0 and at the lowest share decide: agreeing within noise
      (|difference| <= NOISE_K x the standard error of the difference, from each probe's
      `noise`), "not used"; apart, "used";
    - neither (no reading, and a share unprobed or under 2 timed batches): None, undecided.

    Returns {"hardware_decoder": "used" | "not used" | None, "keep_default": bool (the choice
    keeps DALI's default share), "reason": one line, "evidence": the figures}."""
    by_load = {p.hw_decoder_load: p for p in probes if p.hw_decoder_load is not None}
    full = by_load.get(1.0)
    lowest = min((x for x in by_load if x < 1.0), default=None)
    low = by_load.get(lowest)
    util = list(nvjpg_util)
    evidence: dict = {"nvjpg_util": None, "images_per_s": {}, "difference": None, "noise": None}
    if util:
        evidence["nvjpg_util"] = {"mean": round(sum(util) / len(util), 3), "max": round(max(util), 3),
                                  "samples": len(util)}
    for p in (low, full):
        if p is not None:
            evidence["images_per_s"][f"{p.hw_decoder_load:g}"] = round(p.images_per_s, 1)
    agree = None
    if full is not None and low is not None and full.noise is not None and low.noise is not None:
        diff, noise = full.images_per_s - low.images_per_s, math.hypot(full.noise, low.noise)
        evidence["difference"], evidence["noise"] = round(diff, 1), round(noise, 1)
        agree = abs(diff) <= NOISE_K * noise
    rates = (f"images/s at shares {lowest:g} and 1 " + ("agree" if agree else "differ") +
             f" within {NOISE_K:g} x noise ({low.images_per_s:.0f} vs {full.images_per_s:.0f}, noise "
             f"{evidence['noise']:.0f})") if agree is not None else None
    if util and max(util) == 0:
        status, keep, reason = "not used", True, f"NVJPG utilisation 0 in all {len(util)} readings at share 1"
    elif util:
        status, keep = "used", bool(agree)
        reason = f"NVJPG utilisation mean {evidence['nvjpg_util']['mean']:.2f}, max {max(util):.2f} at share 1"
        if agree:
            reason += f"; {rates}: the share makes no difference here"
    elif agree is not None:
        status, keep, reason = ("not used" if agree else "used"), agree, f"no NVML reading; {rates}"
    else:
        status, keep, reason = None, False, "undecided: no NVML reading and no two shares' rates to compare"
    if keep:
        reason += "; hw_decoder_load left at DALI's default"
    return {"hardware_decoder": status, "keep_default": keep, "reason": reason, "evidence": evidence}


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
    expected = (len(HW_ORDER) if "hw_decoder_load" in todo else 0) + \
        (len(thread_candidates(threads)) if "num_threads" in todo else 0)
    timed_s = 0.6 * budget_s / max(1, expected)  # each probe's timed share; the rest builds and warms up

    def measure(threads: int, load: float | None, sample: Callable[[], None] | None = None,
                at_least_s: float = 0.0) -> None:
        if probes and clock() >= deadline:
            return
        probes.append(_probe(replace(chosen, num_threads=threads, hw_decoder_load=load), part_dir,
                             timed_s, deadline, clock, sample, at_least_s))

    load, verdict = spec.hw_decoder_load, None
    if "hw_decoder_load" in todo:
        meter, util = _nvjpg_meter(spec), []
        metered = meter.read() is not None

        def sample() -> None:
            if (value := meter.read()) is not None:
                util.append(value)

        for candidate in HW_ORDER:
            if candidate == 1.0:
                measure(threads, candidate, sample, NVJPG_MIN_S if metered else 0.0)
            else:
                measure(threads, candidate)
        verdict = hardware_verdict(probes, util)
        load = None if verdict["keep_default"] else max(probes, key=lambda p: p.images_per_s).hw_decoder_load
    if "num_threads" in todo:
        for candidate in thread_candidates(threads):
            if not any(p.num_threads == candidate and p.hw_decoder_load == load for p in probes):
                measure(candidate, load)
        at_load = [p for p in probes if p.hw_decoder_load == load]
        if at_load:  # none where DALI's default share was kept and the budget was spent
            fastest = max(p.images_per_s for p in at_load)
            threads = min(p.num_threads for p in at_load if p.images_per_s >= (1 - CLOSE) * fastest)
    elif not any(p.hw_decoder_load == load for p in probes):  # DALI's default kept: its rate
        measure(threads, load)
    best = next((p for p in probes if p.num_threads == threads and p.hw_decoder_load == load), None)
    report = {"tuned": sorted(todo), "chosen": {"num_threads": threads, "hw_decoder_load": load,
                                                "images_per_s": round(best.images_per_s, 1) if best else None},
              "probes": [asdict(p) for p in probes], "seconds": round(clock() - start, 2),
              "budget_s": budget_s,
              "hardware_decoder": verdict["hardware_decoder"] if verdict else None,
              "hardware_decoder_evidence": {"reason": verdict["reason"], **verdict["evidence"]} if verdict else None}
    log.info("rank %d: DALI %s", spec.rank, describe(report))
    return replace(chosen, num_threads=threads, hw_decoder_load=load), report


def _nvjpg_meter(spec: LoaderSpec):
    """NVML's NVJPG utilisation of the spec's GPU (`pipeline.nvjpg`; reads None where not measured)."""
    import torch

    from pipeline.builder import device_id
    from pipeline.nvjpg import NvjpgMeter

    return NvjpgMeter(torch.device("cuda", device_id(spec)) if spec.device == "cuda" else torch.device("cpu"))


def _probe(spec: LoaderSpec, part_dir: Path, timed_s: float, deadline: float, clock: Callable[[], float],
           sample: Callable[[], None] | None = None, at_least_s: float = 0.0) -> Probe:
    """Images/s of `spec`'s pipeline for its first epoch, after a warm-up: at least
    TIMED_BATCHES batches and `timed_s` seconds, less where `deadline` comes first (one batch
    at least) or the part runs out; and the rate's noise from the timed batches' seconds.
    `at_least_s` > 0: timed that long whatever MAX_BATCHES, the part read again from its start
    where it runs out (the deadline still ends it). `sample` is called after every batch,
    warm-up included (the NVJPG readings)."""
    pipe = build_pipeline(spec, spec.epoch, part_dir)
    batch_s: list[float] = []
    timed, t0 = 0, None
    try:
        for _ in range(WARMUP_BATCHES):
            pipe.run()
            if sample:
                sample()
        t0 = last = clock()
        while True:
            try:
                pipe.run()
            except StopIteration:
                if not at_least_s or not timed or last - t0 >= at_least_s:
                    raise
                pipe.reset()  # round the part again, for at_least_s
                continue
            timed += 1
            now = clock()
            batch_s.append(now - last)
            last = now
            if sample:
                sample()
            if now >= deadline or (timed >= TIMED_BATCHES and now - t0 >= max(timed_s, at_least_s)) or \
                    (timed >= MAX_BATCHES and now - t0 >= at_least_s):
                break
    except StopIteration:  # a part shorter than the probe: what was timed counts
        pass
    elapsed = clock() - t0 if t0 is not None and timed else 0.0
    del pipe
    rate = timed * spec.batch_size / elapsed if elapsed > 0 else 0.0
    noise = rate_noise(rate, batch_s)
    return Probe(spec.num_threads, spec.hw_decoder_load, rate, timed, None if noise is None else round(noise, 1))


def describe(report: dict) -> str:
    """One line: what was tuned, the choice and its images/s, every probe, the time it took,
    and whether the hardware JPEG decoder was used (where its share was tuned)."""
    c = report["chosen"]
    probes = ", ".join(f"{p['num_threads']}t/{p['hw_decoder_load']}: {p['images_per_s']:.0f}" for p in report["probes"])
    rate = "not probed" if c["images_per_s"] is None else f"{c['images_per_s']:.0f} images/s"
    line = (f"auto-tuned {'/'.join(report['tuned'])} in {report['seconds']:.1f} s (budget {report['budget_s']:.0f} s): "
            f"num_threads {c['num_threads']}, hw_decoder_load {c['hw_decoder_load']} -> {rate} "
            f"(probed threads/load: {probes})")
    evidence = report.get("hardware_decoder_evidence")
    if evidence:
        line += f"; hardware decoder {report['hardware_decoder'] or 'undecided'}: {evidence['reason']}"
    return line
