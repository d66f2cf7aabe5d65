"""The decode bound: how many JPEGs per second this machine decodes, with nothing else.

No crop, no resize, no batching beyond what the decoder needs: PIL (libjpeg-turbo) in one
process and in one process per core, and DALI's CPU decoder with 1 thread and one per core,
fed encoded bytes already in memory. On a GPU, DALI's `mixed` decoder alone. A loader can
only beat this bound by decoding less than the whole image (ROI decoding for random crops).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.bench_stats import figure


def load_jpegs(shards_dir: Path, split: str = "train", limit: int | None = None) -> list[bytes]:
    """The encoded `.jpg` members of a shard set, in shard order, at most `limit`."""
    blobs: list[bytes] = []
    tars = sorted((Path(shards_dir) / split).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{Path(shards_dir) / split}: no .tar shards to benchmark")
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    blobs.append(tar.extractfile(member).read())
                    if limit is not None and len(blobs) >= limit:
                        return blobs
    return blobs


def _pil_decode(blobs: list[bytes]) -> None:
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            im.convert("RGB").load()


def _pil_worker(shards_dir: str, limit: int, part: int, parts: int, passes: int, ready, go, done) -> None:
    blobs = load_jpegs(Path(shards_dir), limit=limit)[part::parts]
    _pil_decode(blobs[:8])  # warm caches and code paths before the clock starts
    ready.release()
    go.wait()
    for _ in range(passes):
        _pil_decode(blobs)
    done.put(len(blobs) * passes)


def pil_rate(shards_dir: Path, limit: int, processes: int, repeats: int, passes: int = 1) -> dict:
    """PIL decode images/s with `processes` processes, each decoding its share of the images."""
    ctx = mp.get_context("spawn")  # a clean interpreter: no DALI or torch threads inherited
    runs = []
    for _ in range(repeats):
        ready, go, done = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_pil_worker, args=(str(shards_dir), limit, k, processes, passes, ready, go, done))
                 for k in range(processes)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        start = time.perf_counter()
        go.set()
        images = sum(done.get() for _ in procs)
        runs.append(images / (time.perf_counter() - start))
        for p in procs:
            p.join()
    return figure(runs)


def dali_rate(blobs: list[bytes], device: str, threads: int, batch_size: int, repeats: int,
              passes: int = 1) -> dict:
    """DALI decoder-only images/s: `device` "cpu" (device_id None) or "mixed" (GPU 0)."""
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    batches = [arrays[i:i + batch_size] for i in range(0, len(arrays) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"decode bound: {len(arrays)} images is fewer than one batch of {batch_size}")
    state = {"i": 0}

    def feed():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        return batch

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None if device == "cpu" else 0,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def decode_only():
        jpegs = fn.external_source(source=feed, no_copy=True, batch=True)
        return fn.decoders.image(jpegs, device=device, output_type=types.RGB)

    pipe = decode_only()
    pipe.build()
    for _ in range(2):
        pipe.run()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(len(batches) * passes):
            (out,) = pipe.run()
        if device == "mixed":
            out.as_cpu()  # wait for the GPU to finish the last batch
        runs.append(len(batches) * passes * batch_size / (time.perf_counter() - start))
    del pipe
    return figure(runs)
