"""The bench's object-storage part: the same shards read from a local directory, staged
from S3 into the node-local cache, and streamed by DALI's own S3 reader, in the same rounds.

Without a store of the user's, it starts a real S3 endpoint on loopback (`LocalS3`: moto's
server in a child process, the same one the tests use), uploads the shard set, and times:
the upload, staging every train shard into a fresh cache (MB/s and images/s of shards), and
two extra loader sources beside the local `dali cpu rrc` one: `s3 staged` (reads the staged
copy: should match local after the first epoch) and `s3 streamed` (`cache_dir="none"`: one
ranged GET per sample member, every epoch). On this machine the server shares the 2 cores
with the loaders, so streaming pays for the server's CPU too.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from bench.timing import Source, loader_source
from tests.helpers.s3_server import LocalS3  # noqa: E402


class StagingBench:
    """Upload a local shard set to a fresh local S3 server, stage it, and give the loader
    sources that read it from there. `close()` stops the server and drops the cache."""

    def __init__(self, shards_dir: Path, progress) -> None:
        self.shards_dir = Path(shards_dir)
        self.progress = progress
        self.server = LocalS3().start()
        self._saved = {k: os.environ.get(k) for k in self.server.env()}
        os.environ.update(self.server.env())
        self._cache = tempfile.TemporaryDirectory(prefix="bench-stage-")
        self.uri = f"s3://{self.server.new_bucket('bench')}/shards"
        self.figures: dict = {}

    def upload(self) -> None:
        nbytes = sum(p.stat().st_size for p in self.shards_dir.rglob("*") if p.is_file())
        self.progress(f"[s3] uploading {nbytes / 1e6:.1f} MB of shards to {self.uri} (local server)")
        t0 = time.perf_counter()
        pafs.copy_files(str(self.shards_dir), self.uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.server.filesystem())
        self.figures["upload_mb_per_s"] = round(nbytes / 1e6 / (time.perf_counter() - t0), 1)

    def sources(self, batch_size: int, crop_size: int, threads: int) -> list[Source]:
        """Stage every train shard once (timed), then the staged and the streamed loader."""
        from pipeline import make_loader
        from pipeline.shardset import open_split

        args = dict(split="train", batch_size=batch_size, rank=0, world_size=1, crop_size=crop_size, seed=0,
                    backend="dali", device="cpu", crop="rrc", num_threads=threads)
        staged = make_loader(self.uri, cache_dir=self._cache.name, **args)
        data = open_split(self.uri, "train", cache_dir=self._cache.name)  # the set the staged loader reads
        rels = [f"train/{Path(t).name}" for t in data.tars]
        t0 = time.perf_counter()
        paths = data.cache.fetch(rels)
        seconds = time.perf_counter() - t0
        nbytes = sum(p.stat().st_size for p in paths)
        self.figures.update({
            "staged_bytes": nbytes, "staged_shards": len(paths), "stage_s": round(seconds, 3),
            "stage_mb_per_s": round(nbytes / 1e6 / seconds, 1),
            "stage_images_per_s": round(data.num_samples / seconds, 1),
        })
        self.progress(f"[s3] staged {len(paths)} shards, {nbytes / 1e6:.1f} MB in {seconds:.2f} s "
                      f"({self.figures['stage_mb_per_s']} MB/s, {self.figures['stage_images_per_s']} images/s)")
        streamed = make_loader(self.uri, cache_dir="none", **args)
        name = f"rrc {threads} thread{'s' if threads != 1 else ''}"
        meta = {"kind": "loader", "kwargs": {**args, "shards_dir": self.uri}}
        return [loader_source(f"s3 staged: dali cpu {name}", staged, 0, {**meta, "cache_dir": "staged"}),
                loader_source(f"s3 streamed: dali cpu {name}", streamed, 0, {**meta, "cache_dir": "none"})]

    def ratios(self, loaders: dict, threads: int) -> dict:
        """staged / local and streamed / local, same policy and threads, same rounds."""
        name = f"rrc {threads} thread{'s' if threads != 1 else ''}"
        local = loaders.get(f"dali cpu {name}")
        out = {}
        for key, label in (("staged_over_local", "s3 staged"), ("streamed_over_local", "s3 streamed")):
            other = loaders.get(f"{label}: dali cpu {name}")
            if local and other:
                out[key] = round(other["images_per_s"]["median"] / local["images_per_s"]["median"], 3)
        return out

    def close(self) -> None:
        self.server.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._cache.cleanup()


def stage_remote_set(uri: str, progress) -> tuple[Path, dict]:
    """`make bench SHARDS_DIR=s3://...`: stage the user's whole set into the node-local cache
    (timed) and return the local mirror, which the bench then measures like a directory."""
    from pipeline.shardset import open_split

    figures = {"shards_dir": uri}
    t0 = time.perf_counter()
    nbytes = samples = 0
    mirror = None
    for split in ("train", "val"):
        data = open_split(uri, split)
        paths = data.cache.fetch([f"{split}/{Path(t).name}" for t in data.tars])
        nbytes += sum(p.stat().st_size for p in paths)
        samples += data.num_samples
        mirror = data.root
    seconds = time.perf_counter() - t0
    figures.update({"staged_bytes": nbytes, "stage_s": round(seconds, 3),
                    "stage_mb_per_s": round(nbytes / 1e6 / seconds, 1),
                    "stage_images_per_s": round(samples / seconds, 1)})
    progress(f"[s3] staged {uri} into {mirror}: {nbytes / 1e6:.1f} MB in {seconds:.1f} s")
    return mirror, figures
