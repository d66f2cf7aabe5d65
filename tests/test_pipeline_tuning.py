"""Self-tuned decoding (`num_threads` / `hw_decoder_load` = "auto", pipeline.tuning) and the
loader's usage figures (pipeline.usage), on real shards and real DALI CPU pipelines."""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import make_loader
from pipeline.builder import build_pipeline
from pipeline.tuning import HW_LOADS, Probe, describe, hardware_verdict, rate_noise, thread_candidates, thread_cap, tune
from pipeline.usage import DaliThreads, memory_mb, pool_of

CROP = 56


def loader(shards, **kw):
    return make_loader(shards, "train", batch_size=16, device="cpu", crop_size=CROP, **kw)


def test_thread_candidates_most_first() -> None:
    assert thread_candidates(1) == [1]
    assert thread_candidates(6) == [6, 4, 2, 1]
    assert thread_candidates(16) == [16, 8, 4, 2, 1]


def test_auto_threads_probes_each_candidate_picks_one_and_logs(demo_shards, caplog, monkeypatch) -> None:
    # no deadline: every candidate is probed whatever the machine's load (what is asserted does
    # not depend on the clock; each probe runs to MAX_BATCHES or the end of the part)
    monkeypatch.setattr("pipeline.tuning.BUDGET_S", math.inf)
    with caplog.at_level(logging.INFO, logger="pipeline.tuning"):
        tuned = loader(demo_shards, num_threads="auto", hw_decoder_load="auto")
    report = tuned.tuning
    assert report["tuned"] == ["num_threads"]  # the CPU graph has no hardware decoder share to tune
    probed = [p["num_threads"] for p in report["probes"]]
    assert probed == thread_candidates(thread_cap("cpu"))
    assert all(p["images_per_s"] > 0 and p["batches"] >= 1 and p["hw_decoder_load"] is None for p in report["probes"])
    chosen = report["chosen"]
    assert tuned.spec.num_threads == chosen["num_threads"] in probed and tuned.spec.hw_decoder_load is None
    fastest = max(p["images_per_s"] for p in report["probes"])
    picked = next(p for p in report["probes"] if p["num_threads"] == chosen["num_threads"])
    assert picked["images_per_s"] >= 0.97 * fastest
    assert tuned.spec.auto == ()
    line = next(r.getMessage() for r in caplog.records if "auto-tuned" in r.getMessage())
    assert f"num_threads {chosen['num_threads']}" in line and "images/s" in line
    assert report["hardware_decoder"] is None and "hardware decoder" not in line  # no share was tuned
    # the tuned loader reads its whole epoch as any other
    keys = [k for _, _, ks in loader(demo_shards, num_threads="auto", return_keys=True) for k in ks]
    assert len(keys) == len(set(keys)) == len(tuned) * 16


def test_the_budget_bounds_the_probe(demo_shards) -> None:
    spec = replace(loader(demo_shards, num_threads=1).spec, auto=("num_threads",))
    chosen, report = tune(spec, budget_s=0.0)
    assert len(report["probes"]) == 1  # past the deadline: one probe, one timed batch, then the choice
    assert report["probes"][0]["batches"] == 1 and chosen.num_threads == report["probes"][0]["num_threads"]


def test_the_budget_is_counted_on_the_clock_it_is_given(demo_shards, monkeypatch) -> None:
    # a clock that moves 1 s per reading: the count of probes follows from the budget alone
    monkeypatch.setattr("pipeline.tuning.thread_cap", lambda device: 8)  # candidates 8, 4, 2, 1
    ticks = itertools.count()
    spec = replace(loader(demo_shards, num_threads=1).spec, auto=("num_threads",))
    _, report = tune(spec, budget_s=10.0, clock=lambda: float(next(ticks)))
    # start 0, deadline 10, each probe's timed share 0.6 * 10 / 4 = 1.5. Probe 8: t0 1, batches
    # end at 2..5 (4 batches and 4 s >= 1.5 s), end 6. Probe 4: starts at 7 < 10, t0 8, batches
    # end at 9, 10 (the deadline), end 11. Threads 2 and 1: 12, 13 >= 10, not probed.
    assert [(p["num_threads"], p["batches"]) for p in report["probes"]] == [(8, 4), (4, 2)]
    assert report["seconds"] == 14.0
    assert [p["noise"] for p in report["probes"]] == [0.0, 0.0]  # every batch took one "second"


def test_hardware_share_on_a_graph_without_the_hardware_decoder_keeps_dalis_default(demo_shards, caplog) -> None:
    """The share tuned on real DALI pipelines that have no hardware decoder (the CPU graph: the
    share changes nothing, as where the mixed decoder falls back), on a clock of 1 s per
    reading, so every probe's rate is the same whatever the machine's load: no NVML reading,
    rates equal within noise: "not used", DALI's default share kept and its rate probed."""
    ticks = itertools.count()
    spec = replace(loader(demo_shards, num_threads=1).spec, auto=("hw_decoder_load",))
    with caplog.at_level(logging.INFO, logger="pipeline.tuning"):
        chosen, report = tune(spec, budget_s=40.0, clock=lambda: float(next(ticks)))
    # start 0, deadline 40, timed share 0.6 x 40 / 4 = 6 s. Share 1.0: t0 1, 6 batches (4, and
    # 6 s) end at 2..7, end 8. Each next probe adds a deadline check: 0.5 from 9 (end 17), 0.75
    # from 18 (end 26), 0.9 from 27 (end 35); DALI's default: check 36, t0 37, batches end at
    # 38, 39, 40 (the deadline), end 41: 3 x 16 images in 4 s
    assert [(p["hw_decoder_load"], p["batches"]) for p in report["probes"]] == \
        [(1.0, 6), (0.5, 6), (0.75, 6), (0.9, 6), (None, 3)]
    assert report["hardware_decoder"] == "not used" and chosen.hw_decoder_load is None
    assert report["chosen"]["hw_decoder_load"] is None and report["chosen"]["images_per_s"] == 12.0
    assert report["seconds"] == 42.0
    evidence = report["hardware_decoder_evidence"]
    assert evidence["nvjpg_util"] is None and evidence["difference"] == 0.0 and evidence["noise"] == 0.0
    assert "no NVML reading" in evidence["reason"] and "left at DALI's default" in evidence["reason"]
    line = next(r.getMessage() for r in caplog.records if "auto-tuned" in r.getMessage())
    assert "hw_decoder_load None" in line and "hardware decoder not used" in line


def test_the_probe_nvml_reads_is_timed_past_max_batches_and_the_parts_end(demo_shards, tmp_path) -> None:
    """The share-1.0 probe where NVML reads NVJPG is timed `at_least_s` (NVML's sampling
    period), however short the part: real pipelines, read again from the start at its end;
    on a clock of 1 s per reading, so the count of batches follows from at_least_s alone."""
    from pipeline.tuning import MAX_BATCHES, WARMUP_BATCHES, _probe

    spec = loader(demo_shards, num_threads=1).spec
    per_part = spec.num_batches - WARMUP_BATCHES  # timed batches before the part runs out
    ticks = itertools.count()
    readings = []
    got = _probe(spec, tmp_path, timed_s=0.0, deadline=math.inf, clock=lambda: float(next(ticks)),
                 sample=lambda: readings.append(1), at_least_s=70.0)
    assert per_part < MAX_BATCHES < 70
    assert got.batches == 70 and got.images_per_s == 70 * 16 / 71  # t0 0, batches end at 1..70, end 71
    assert len(readings) == WARMUP_BATCHES + 70 and got.noise == 0.0


def probe(load: float | None, rate: float, noise: float | None, threads: int = 8, batches: int = 8) -> Probe:
    return Probe(threads, load, rate, batches, noise)


# hardware-share probes as a GPU worker's might read (images/s and their noise): the share
# matters (1.0 well above 0.5), and it does not (the same rate within noise)
APART = [probe(1.0, 5210.0, 61.0), probe(0.5, 3890.0, 55.0), probe(0.75, 4560.0, 70.0), probe(0.9, 4980.0, 66.0)]
ALIKE = [probe(1.0, 2412.0, 48.0), probe(0.5, 2466.0, 52.0), probe(0.75, 2440.0, 50.0), probe(0.9, 2391.0, 47.0)]


def test_verdict_nvjpg_idle_at_share_one_is_not_used_whatever_the_rates() -> None:
    v = hardware_verdict(APART, [0.0, 0.0, 0.0, 0.0, 0.0])
    assert v["hardware_decoder"] == "not used" and v["keep_default"]
    assert "utilisation 0 in all 5 readings" in v["reason"] and v["evidence"]["nvjpg_util"]["max"] == 0.0


def test_verdict_nvjpg_busy_is_used_and_the_fastest_share_is_chosen() -> None:
    v = hardware_verdict(APART, [0.0, 0.4, 0.6, 0.6])  # NVML reads whole percents
    assert v["hardware_decoder"] == "used" and not v["keep_default"]
    assert v["evidence"]["nvjpg_util"] == {"mean": 0.4, "max": 0.6, "samples": 4}
    assert v["evidence"]["images_per_s"] == {"0.5": 3890.0, "1": 5210.0}
    assert v["evidence"]["difference"] == 1320.0 and v["evidence"]["noise"] == round(math.hypot(61, 55), 1)


def test_verdict_nvjpg_busy_but_shares_alike_keeps_the_default() -> None:
    v = hardware_verdict(ALIKE, [0.2, 0.3])
    assert v["hardware_decoder"] == "used" and v["keep_default"]  # measured busy: used, but the share changes nothing
    assert "agree within 2 x noise" in v["reason"] and "left at DALI's default" in v["reason"]


def test_verdict_without_nvml_the_rates_decide() -> None:
    alike, apart = hardware_verdict(ALIKE, []), hardware_verdict(APART, [])
    assert (alike["hardware_decoder"], alike["keep_default"]) == ("not used", True)
    assert abs(ALIKE[0].images_per_s - ALIKE[1].images_per_s) <= 2 * math.hypot(48, 52)  # 54 <= 141: within noise
    assert (apart["hardware_decoder"], apart["keep_default"]) == ("used", False)
    assert alike["evidence"]["nvjpg_util"] is None and "no NVML reading" in alike["reason"]


def test_verdict_undecided_without_nvml_or_two_comparable_shares() -> None:
    budget_cut = hardware_verdict(APART[:1], [])  # only share 1.0 probed
    one_batch = hardware_verdict([probe(1.0, 5000.0, None, batches=1), probe(0.5, 5000.0, None, batches=1)], [])
    for v in (budget_cut, one_batch):
        assert v["hardware_decoder"] is None and not v["keep_default"] and v["reason"].startswith("undecided")


def test_rate_noise_is_the_standard_error_of_the_rate() -> None:
    assert rate_noise(1600.0, [0.01]) is None  # one batch: no spread
    assert rate_noise(1600.0, [0.01] * 4) == 0.0
    # batches of 0.009, 0.011, 0.010, 0.010 s: std 0.000816, mean 0.010 -> 1600 x 0.0816 / 2
    assert rate_noise(1600.0, [0.009, 0.011, 0.010, 0.010]) == pytest.approx(1600 * 0.0008165 / 0.010 / 2, rel=1e-3)


def test_describe_says_whether_the_hardware_decoder_was_used() -> None:
    report = {"tuned": ["hw_decoder_load"], "seconds": 3.2, "budget_s": 8.0,
              "chosen": {"num_threads": 8, "hw_decoder_load": None, "images_per_s": None},
              "probes": [{"num_threads": 8, "hw_decoder_load": 1.0, "images_per_s": 2412.0}],
              "hardware_decoder": "not used",
              "hardware_decoder_evidence": {"reason": "NVJPG utilisation 0 in all 5 readings at share 1; "
                                                      "hw_decoder_load left at DALI's default"}}
    line = describe(report)
    assert "\n" not in line and "hw_decoder_load None -> not probed" in line
    assert line.endswith("hardware decoder not used: NVJPG utilisation 0 in all 5 readings at share 1; "
                         "hw_decoder_load left at DALI's default")


def test_an_empty_val_part_is_not_probed(demo_shards) -> None:
    def val(rank: int, world_size: int):
        return make_loader(demo_shards, "val", batch_size=16, rank=rank, world_size=world_size, device="cpu",
                           crop_size=CROP, num_threads="auto")

    full, empty = val(1, 2), val(0, 60)  # 50 val samples: rank 0 of 60 holds none
    assert full.tuning is not None and full.tuning["tuned"] == ["num_threads"]
    assert empty.num_samples == 0 and empty.tuning is None and list(empty) == []


@pytest.mark.parametrize("kw, match", [
    ({"num_threads": "many"}, "num_threads='many'"),
    ({"num_threads": 0}, "num_threads=0"),
    ({"hw_decoder_load": 1.5}, "hw_decoder_load=1.5"),
    ({"hw_decoder_load": "high"}, "hw_decoder_load='high'"),
    ({"backend": "torch", "num_threads": "auto"}, "backend='dali'"),
])
def test_bad_settings_one_line(demo_shards, kw, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        make_loader(demo_shards, "train", batch_size=16, device="cpu", crop_size=CROP, **kw)
    assert "\n" not in str(err.value)


def dali_pools(**started: int) -> dict[str | None, int]:
    """This process's threads per DALI pool (`pool_of` of each thread's name in /proc), once
    the pools named in `started` show at least that many threads: a DALI thread names itself
    when it starts, which may trail the pipeline's build. The wait gives up after 60 s (a pool
    that never shows is then reported by the caller's assertion, not hung on)."""
    give_up = time.monotonic() + 60
    while True:
        out: dict[str | None, int] = {}
        for comm in Path("/proc/self/task").glob("*/comm"):
            try:
                pool = pool_of(comm.read_text())
            except OSError:  # the thread ended
                continue
            out[pool] = out.get(pool, 0) + 1
        if all(out.get(pool, 0) >= n for pool, n in started.items()) or time.monotonic() > give_up:
            return out
        time.sleep(0.01)


def test_pool_threads_are_told_apart_by_name() -> None:
    # names as /proc shows them (15 bytes): seen here on DALI 2.4 (CPU worker pool, executor,
    # reader; "[DALI][NT<i>]" with DALI_USE_NEW_THREAD_POOL=1) and as DALI names the mixed
    # decoder's pool ("[DALI][TP<i>]MixedDecoder", cut)
    workers = ["[DALI][TP0]Exec", "[DALI][TP12]Exe", "[DALI][NT3]Exec", "[DALI][TP1000]E"]
    mixed = ["[DALI][TP0]Mixe", "[DALI][TP15]Mix", "[DALI][NT2]Mixe"]
    others = ["[DALI] Executor", "PrefetchWorker", "python", "jemalloc_bg_thd", "[DALI][TP10000]", "[DALI][TP1]Othe"]
    assert [pool_of(n) for n in workers] == ["worker"] * 4
    assert [pool_of(n + "\n") for n in mixed] == ["mixed"] * 3  # /proc's comm ends in a newline
    assert [pool_of(n) for n in others] == [None] * 6


def test_dali_thread_utilisation_reads_the_pool(demo_shards) -> None:
    spec = loader(demo_shards, num_threads=2).spec
    window = itertools.count()  # each utilisation() window lasts one "second": it returns pool CPU s / threads
    clock = DaliThreads(spec.num_threads, clock=lambda: float(next(window)))
    assert clock.utilisation() == 0.0  # no pipeline: no DALI pool threads
    pipe = build_pipeline(spec, 0)
    pools = dali_pools(worker=spec.num_threads)
    assert pools.get("worker") == spec.num_threads and "mixed" not in pools, pools  # the CPU graph's pool
    cpu = time.process_time()
    clock.utilisation()
    for _ in range(len(loader(demo_shards, num_threads=2)) - 1):
        pipe.run()
    pool_cpu = clock.utilisation() * spec.num_threads
    cpu = time.process_time() - cpu  # encloses the pool's window
    assert 0 < pool_cpu <= cpu  # the pool decoded, and is a part of this process's CPU time
    assert clock.mixed_utilisation() is None  # no mixed decoder on the CPU
    del pipe


def test_dali_thread_utilisation_is_cpu_over_wall_and_threads(monkeypatch) -> None:
    # pool threads' (pool, CPU seconds) at two readings: two CPU workers and, as on a GPU
    # graph, the mixed decoder's pool (threads 7 and 8), which used to be counted with them
    cpu = iter([{"1": ("worker", 1.0), "7": ("mixed", 3.0), "8": ("mixed", 3.0)},
                {"1": ("worker", 2.5), "2": ("worker", 0.5), "7": ("mixed", 5.0), "8": ("mixed", 4.6)}])
    monkeypatch.setattr(DaliThreads, "_cpu_by_thread", lambda self: next(cpu))
    wall = iter([10.0, 12.0])
    clock = DaliThreads(2, clock=lambda: next(wall))
    assert clock.utilisation() == (1.5 + 0.5) / (2.0 * 2)  # a thread born in the window counts from 0
    assert clock.mixed_utilisation() == pytest.approx((2.0 + 1.6) / (2.0 * 2))  # apart: together they read 1.4


def test_memory_is_told_anonymous_and_file_backed_apart(tmp_path) -> None:
    """Issue 23: a mapped file (as DALI maps its tars) shows in mem_file_mb, not in mem_anon_mb,
    which is what a leak grows."""
    import mmap

    size = 64 << 20
    data = tmp_path / "mapped.bin"
    with open(data, "wb") as f:
        for _ in range(size >> 20):
            f.write(bytes(1 << 20))
    before = memory_mb(torch.device("cpu"))
    assert before["mem_anon_mb"] > 50 and before["mem_file_mb"] > 0 and before["dali_device_mb"] is None
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        touched = sum(m[i] for i in range(0, size, 4096))  # every page read, as a reader does
        mapped = memory_mb(torch.device("cpu"))
    assert touched == 0
    assert mapped["mem_file_mb"] - before["mem_file_mb"] > 0.9 * size / 2**20
    assert mapped["mem_anon_mb"] - before["mem_anon_mb"] < 0.1 * size / 2**20  # the mapping is not anonymous
    held = bytearray(b"\1" * size)  # anonymous memory that stays: what a leak looks like
    grown = memory_mb(torch.device("cpu"))
    assert grown["mem_anon_mb"] - mapped["mem_anon_mb"] > 0.9 * size / 2**20 and held[-1] == 1


@pytest.mark.gpu
def test_auto_on_the_gpu_tunes_the_hardware_share_then_the_threads(demo_shards, monkeypatch, capsys) -> None:
    """What was probed and chosen, never how many probes a budget allowed (no deadline here):
    every share and every thread count, the verdict on the hardware decoder and a choice
    consistent with it. NVML's NVJPG reading, where there is one, is the verdict's evidence."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make gpu-check)")
    from pipeline.nvjpg import NvjpgMeter

    monkeypatch.setattr("pipeline.tuning.BUDGET_S", math.inf)
    tuned = make_loader(demo_shards, "train", batch_size=16, device="cuda", crop_size=CROP, num_threads="auto",
                        hw_decoder_load="auto")
    report = tuned.tuning
    with capsys.disabled():
        print(f"\nauto on the GPU: {describe(report)}")
    assert report["tuned"] == ["hw_decoder_load", "num_threads"]
    cap = thread_cap("cuda")
    shares = [p["hw_decoder_load"] for p in report["probes"] if p["num_threads"] == cap][:len(HW_LOADS)]
    assert sorted(shares) == sorted(HW_LOADS) and shares[:2] == [1.0, 0.5]  # the verdict's two first
    verdict = report["hardware_decoder"]
    assert verdict in ("used", "not used"), report["hardware_decoder_evidence"]
    load = tuned.spec.hw_decoder_load
    assert load is None if verdict == "not used" else load in (None, *HW_LOADS)
    assert {p["num_threads"] for p in report["probes"] if p["hw_decoder_load"] == load} == set(thread_candidates(cap))
    measured = NvjpgMeter(torch.device("cuda", torch.cuda.current_device())).read() is not None
    assert (report["hardware_decoder_evidence"]["nvjpg_util"] is not None) == measured
    images, labels = next(iter(tuned))
    assert images.is_cuda and labels.is_cuda and images.shape == (16, 3, CROP, CROP)


@pytest.mark.gpu
def test_dali_cpu_util_on_a_gpu_graph_counts_the_worker_pool_only(demo_shards) -> None:
    """A GPU graph runs two pools of num_threads threads: DALI's CPU workers and the mixed
    decoder's (counted together, dali_cpu_util read up to 2). Each is found by its threads'
    names, and each share is read apart."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make gpu-check)")
    spec = make_loader(demo_shards, "train", batch_size=16, device="cuda", crop_size=CROP, num_threads=2).spec
    window = itertools.count()
    clock = DaliThreads(spec.num_threads, clock=lambda: float(next(window)))
    pipe = build_pipeline(spec, 0)
    for _ in range(2):
        pipe.run()
    pools = dali_pools(worker=spec.num_threads)
    assert pools.get("worker") == spec.num_threads and pools.get("mixed") == spec.num_threads, pools
    clock.utilisation()
    for _ in range(8):
        pipe.run()
    worker = clock.utilisation()
    mixed = clock.mixed_utilisation()
    print(f"\nGPU graph, 2 threads: worker pool {worker:.3f}, mixed decoder pool {mixed:.3f} of a 1 s window")
    assert worker is not None and mixed is not None and worker >= 0 and mixed >= 0
    del pipe
