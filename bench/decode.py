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

from bench.figures import figure


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


def pil_decode(blobs: list[bytes]) -> None:
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            im.convert("RGB").load()


def _pil_worker(shards_dir: str, limit: int, part: int, parts: int, passes: int, ready, go, done) -> None:
    blobs = load_jpegs(Path(shards_dir), limit=limit)[part::parts]
    pil_decode(blobs[:8])  # warm caches and code paths before the clock starts
    ready.release()
    go.wait()
    for _ in range(passes):
        pil_decode(blobs)
    done.put(len(blobs) * passes)


def pil_rate(shards_dir: Path, limit: int, processes: int, repeats: int, passes: int = 1) -> dict:
    """PIL decode images/s with `processes` processes, each decoding its share of the images."""
    # fork: a spawned child would re-import the pipeline package (torch, seconds); call this
    # before any DALI pipeline or DataLoader exists, so that no worker threads are inherited
    ctx = mp.get_context("fork")
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


def pil_source(name: str, blobs: list[bytes], batch_size: int):
    """A batch source that decodes `batch_size` images with PIL in this thread per batch:
    the per-core PIL rate, timed in the same rounds as the loaders."""
    from bench.timing import Source

    def run():
        i = 0
        while True:
            pil_decode([blobs[(i + k) % len(blobs)] for k in range(batch_size)])
            i = (i + batch_size) % len(blobs)
            yield batch_size, True

    return Source(name, run)


def dali_decode_source(name: str, blobs: list[bytes], device: str, threads: int, batch_size: int,
                       hw_decoder_load: float | None = None):
    """A batch source that runs DALI's decoder alone on encoded bytes held in memory:
    `device` "cpu" (device_id None) or "mixed" (GPU 0, the hardware decoder where there is one).
    `hw_decoder_load` (mixed only): the share of each batch sent to the hardware decoder, the
    rest Huffman-decoded on the `threads` CPU threads; None keeps DALI's default."""
    from bench.timing import pipeline_source

    if hw_decoder_load is not None and (device != "mixed" or not 0.0 <= hw_decoder_load <= 1.0):
        raise ValueError(f"hw_decoder_load={hw_decoder_load!r}: a share in [0, 1], for device='mixed' only")
    extra = {} if hw_decoder_load is None else {"hw_decoder_load": float(hw_decoder_load)}
    if device == "mixed":  # as the loader's graphs decode (pipeline.dali._decoder)
        extra["jpeg_fancy_upsampling"] = True

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    if len(arrays) < batch_size:
        raise ValueError(f"decode bound: {len(arrays)} images is fewer than one batch of {batch_size}")
    batches = [arrays[i:i + batch_size] for i in range(0, len(arrays) - batch_size + 1, batch_size)]

    def build():
        from nvidia.dali import fn, pipeline_def, types

        state = {"i": 0}

        def feed():
            state["i"] += 1
            return batches[(state["i"] - 1) % len(batches)]

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None if device == "cpu" else 0,
                      prefetch_queue_depth=2)
        def decode_only():
            jpegs = fn.external_source(source=feed, no_copy=True, batch=True)
            return fn.decoders.image(jpegs, device=device, output_type=types.RGB, **extra)

        pipe = decode_only()
        pipe.build()
        return pipe

    return pipeline_source(name, build, batch_size)
