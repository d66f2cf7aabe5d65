"""`python -m shards verify DIR`: re-read every shard against its index and the manifest.

Per shard: the `.idx` must equal the index rebuilt from the tar; each indexed member is read
at its offset, every `.jpg` must decode fully as a baseline RGB JPEG of the manifest's size
and byte count, every `.cls` must hold the manifest's label. Every manifest row must be found
exactly once. Problems name the shard and the key.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from shards.index import index_bytes
from shards.layouts import IMAGE_EXT, LABEL_EXT, MANIFEST_FILE, SPLITS, split_tars


@dataclass
class VerifyReport:
    samples: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problems"
        return f"verified {self.samples} samples in {self.shards} shards: {verdict}"


def _check_image(data: bytes) -> tuple[int, int] | str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return f"not an RGB JPEG ({img.format} {img.mode})"
            if img.info.get("progressive") or img.info.get("progression"):
                return "progressive JPEG (baseline expected)"
            img.load()
            return img.size
    except Exception as e:  # any decode failure is a finding, not a crash
        return f"does not decode ({e})"


def check_shard(job: tuple[str, str, dict[str, tuple]]) -> tuple[int, list[str], list[str]]:
    """(samples read, problems, keys found) for one tar; `expected` maps key -> manifest row
    fields (label, width, height, nbytes)."""
    tar_path, where, expected = job
    tar = Path(tar_path)
    problems: list[str] = []
    idx = tar.with_suffix(".idx")
    try:
        rebuilt = index_bytes(tar)
    except ValueError as e:
        return 0, [f"{where}: {e}"], []
    if not idx.is_file():
        problems.append(f"{where}: index {idx.name} missing (rebuild: wds2idx {tar} {idx})")
    elif idx.read_bytes() != rebuilt:
        problems.append(f"{where}: index {idx.name} does not match the tar (rebuild: wds2idx {tar} {idx})")
    keys: list[str] = []
    with open(tar, "rb") as f:
        for line in rebuilt.decode().splitlines()[1:]:
            parts = line.split(" ")
            members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)}
            key = parts[3].rsplit("/", 1)[-1].split(".", 1)[0]
            keys.append(key)
            row = expected.get(key)
            if row is None:
                problems.append(f"{where} key {key}: not in the manifest for this shard")
                continue
            label, width, height, nbytes = row
            if IMAGE_EXT not in members or LABEL_EXT not in members:
                problems.append(f"{where} key {key}: missing .{IMAGE_EXT} or .{LABEL_EXT} member")
                continue
            blobs = {}
            for ext in (IMAGE_EXT, LABEL_EXT):
                offset, size, _ = members[ext]
                f.seek(offset)
                blobs[ext] = f.read(size)
            if blobs[LABEL_EXT].strip() != str(label).encode():
                problems.append(f"{where} key {key}: label {blobs[LABEL_EXT]!r} != manifest {label}")
            if len(blobs[IMAGE_EXT]) != nbytes:
                problems.append(f"{where} key {key}: {len(blobs[IMAGE_EXT])} bytes != manifest {nbytes}")
            size = _check_image(blobs[IMAGE_EXT])
            if isinstance(size, str):
                problems.append(f"{where} key {key}: image {size}")
            elif size != (width, height):
                problems.append(f"{where} key {key}: image {size[0]}x{size[1]} != manifest {width}x{height}")
    return len(keys), problems, keys


def verify(shards_dir: Path, workers: int | None = None) -> VerifyReport:
    shards_dir = Path(shards_dir)
    manifest_path = shards_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found; is {shards_dir} a shard directory (python -m shards build)?")
    rows = pq.read_table(manifest_path, columns=["key", "split", "shard", "label", "width", "height", "nbytes"]).to_pylist()
    expected: dict[tuple[str, str], dict[str, tuple]] = defaultdict(dict)
    for r in rows:
        expected[(r["split"], r["shard"])][r["key"]] = (r["label"], r["width"], r["height"], r["nbytes"])
    jobs = []
    for split in SPLITS:
        for tar in split_tars(shards_dir, split):
            jobs.append((str(tar), f"{split}/{tar.name}", expected.pop((split, tar.name), {})))
    report = VerifyReport(shards=len(jobs))
    remaining = {where: set(exp) for _, where, exp in jobs}
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = pool.map(check_shard, jobs, chunksize=1)
    else:
        results = [check_shard(j) for j in jobs]
    for (_, where, _), (n, problems, keys) in zip(jobs, results):
        report.samples += n
        report.problems += problems
        left = remaining[where] - set(keys)
        report.problems += [f"{where} key {k}: appears {c} times" for k, c in Counter(keys).items() if c > 1]
        report.problems += [f"{where} key {k}: in the manifest but not in the shard" for k in sorted(left)]
    for (split, shard), exp in sorted(expected.items()):
        report.problems += [f"{split}/{shard} key {k}: in the manifest but the shard is missing" for k in sorted(exp)][:20]
    if not jobs:
        report.problems.append(f"{shards_dir}: no shards under train/ or val/")
    return report
