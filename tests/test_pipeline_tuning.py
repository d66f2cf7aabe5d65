"""Self-tuned decoding (`num_threads` / `hw_decoder_load` = "auto", pipeline.tuning) and the
loader's usage figures (pipeline.usage), on real shards and real DALI CPU pipelines."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import pytest
import torch

from pipeline import make_loader
from pipeline.builder import build_pipeline
from pipeline.tuning import thread_candidates, thread_cap, tune
from pipeline.usage import DaliThreads, memory_mb

CROP = 56


def loader(shards, **kw):
    return make_loader(shards, "train", batch_size=16, device="cpu", crop_size=CROP, **kw)


def test_thread_candidates_most_first() -> None:
    assert thread_candidates(1) == [1]
    assert thread_candidates(6) == [6, 4, 2, 1]
    assert thread_candidates(16) == [16, 8, 4, 2, 1]


def test_auto_threads_probes_each_candidate_picks_one_and_logs(demo_shards, caplog, monkeypatch) -> None:
    monkeypatch.setattr("pipeline.tuning.BUDGET_S", 60.0)  # every candidate, however loaded the machine
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


def test_dali_thread_utilisation_reads_the_pool(demo_shards) -> None:
    spec = loader(demo_shards, num_threads=2).spec
    window = itertools.count()  # each utilisation() window lasts one "second": it returns pool CPU s / threads
    clock = DaliThreads(spec.num_threads, clock=lambda: float(next(window)))
    assert clock.utilisation() == 0.0  # no pipeline: no DALI pool threads
    pipe = build_pipeline(spec, 0)
    cpu = time.process_time()
    clock.utilisation()
    for _ in range(len(loader(demo_shards, num_threads=2)) - 1):
        pipe.run()
    pool_cpu = clock.utilisation() * spec.num_threads
    cpu = time.process_time() - cpu  # encloses the pool's window
    assert 0 < pool_cpu <= cpu  # the pool decoded, and is a part of this process's CPU time
    del pipe


def test_dali_thread_utilisation_is_cpu_over_wall_and_threads(monkeypatch) -> None:
    cpu = iter([{"1": 1.0}, {"1": 2.5, "2": 0.5}])  # pool threads' CPU seconds at two readings
    monkeypatch.setattr(DaliThreads, "_cpu_by_thread", lambda self: next(cpu))
    wall = iter([10.0, 12.0])
    clock = DaliThreads(2, clock=lambda: next(wall))
    assert clock.utilisation() == (1.5 + 0.5) / (2.0 * 2)  # a thread born in the window counts from 0


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
def test_auto_on_the_gpu_tunes_the_hardware_share_then_the_threads(demo_shards) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make gpu-check)")
    from pipeline.tuning import HW_LOADS

    tuned = make_loader(demo_shards, "train", batch_size=16, device="cuda", crop_size=CROP, num_threads="auto",
                        hw_decoder_load="auto")
    report = tuned.tuning
    assert report["tuned"] == ["hw_decoder_load", "num_threads"]
    loads = [p["hw_decoder_load"] for p in report["probes"][:len(HW_LOADS)]]
    assert loads == list(HW_LOADS) and tuned.spec.hw_decoder_load in HW_LOADS
    assert {p["hw_decoder_load"] for p in report["probes"][len(HW_LOADS):]} <= {tuned.spec.hw_decoder_load}
    images, labels = next(iter(tuned))
    assert images.is_cuda and labels.is_cuda and images.shape == (16, 3, CROP, CROP)
