"""`python -m shards verify DIR|URI`: re-read every shard against its index, the manifest and
shards.parquet.

Per shard: its size, sha256 and sample count must match shards.parquet (when the set has one:
sets from other WebDataset tools do not); the `.idx` must equal the index rebuilt from the
tar; each indexed member is read at its offset, every `.jpg` must decode fully as a baseline
RGB JPEG of the manifest's size and byte count, every `.cls` must hold the manifest's label.
Every manifest row must be found exactly once. Problems name the shard and the key. A remote
set (`s3://bucket/prefix`) is read shard by shard into a temporary directory (the sha256 is
taken on the way), so the local disk holds one shard per worker.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
from PIL import Image

from shards.index import index_bytes, parse_index
from shards.layouts import IDX_SUFFIX, IMAGE_EXT, LABEL_EXT, MANIFEST_FILE, REPACK, SHARDS_FILE, SPLITS, TAR_SUFFIX
from shards.location import Location, check_reachable, resolve
from shards.upload import read_hashed


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


def check_shard(job: tuple) -> tuple[int, list[str], list[str]]:
    """(samples read, problems, keys found) for one tar (a path or a URI); `expected` maps
    key -> manifest row fields (label, width, height, nbytes); `listed` is the shard's
    shards.parquet row (bytes, samples, sha256) or None."""
    tar_uri, where, expected, listed = job
    loc = resolve(tar_uri)
    if not loc.remote:
        return _check_local(loc.local_path(), where, expected, listed)
    with tempfile.TemporaryDirectory(prefix="shards-verify-") as tmp:
        tar = Path(tmp) / loc.name
        hashed = read_hashed(loc, copy_to=tar)
        idx = Location(loc.uri[: -len(TAR_SUFFIX)] + IDX_SUFFIX, loc.fs, loc.path[: -len(TAR_SUFFIX)] + IDX_SUFFIX)
        if idx.is_file():
            idx.download(tar.with_suffix(IDX_SUFFIX))
        n, problems, keys = _check_local(tar, where, expected, listed, hashed)
    # name the objects, not the temporary copies
    problems = [p.replace(str(tar.with_suffix(IDX_SUFFIX)), idx.uri).replace(str(tar), loc.uri) for p in problems]
    return n, problems, keys


def _check_listed(where: str, listed: tuple[int, int, str], hashed: tuple[int, str], samples: int | None) -> list[str]:
    nbytes, count, sha256 = listed
    problems = []
    if hashed[0] != nbytes:
        problems.append(f"{where}: {hashed[0]} bytes != shards.parquet {nbytes}")
    if hashed[1] != sha256:
        problems.append(f"{where}: sha256 {hashed[1][:16]}... != shards.parquet {sha256[:16]}... "
                        "(the tar changed after packing: restore or re-pack it)")
    if samples is not None and samples != count:
        problems.append(f"{where}: {samples} samples != shards.parquet {count}")
    return problems


def _check_local(tar: Path, where: str, expected: dict[str, tuple], listed: tuple | None,
                 hashed: tuple[int, str] | None = None) -> tuple[int, list[str], list[str]]:
    problems: list[str] = []
    idx = tar.with_suffix(".idx")
    if listed is not None and hashed is None:
        hashed = read_hashed(resolve(tar))
    try:
        rebuilt = index_bytes(tar)
    except ValueError as e:
        problems = _check_listed(where, listed, hashed, None) if listed is not None else []
        return 0, problems + [f"{where}: {e}"], []
    if not idx.is_file():
        problems.append(f"{where}: index {idx.name} missing (rebuild: wds2idx {tar} {idx})")
    elif idx.read_bytes() != rebuilt:
        problems.append(f"{where}: index {idx.name} does not match the tar (rebuild: wds2idx {tar} {idx})")
    keys: list[str] = []
    with open(tar, "rb") as f:
        for entry in parse_index(rebuilt.decode(), str(tar)):
            members = {m.ext: m for m in entry.members}
            key = entry.key.rsplit("/", 1)[-1]
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
                f.seek(members[ext].offset)
                blobs[ext] = f.read(members[ext].size)
            if blobs[LABEL_EXT].strip() != str(label).encode():
                problems.append(f"{where} key {key}: label {blobs[LABEL_EXT]!r} != manifest {label}")
            if len(blobs[IMAGE_EXT]) != nbytes:
                problems.append(f"{where} key {key}: {len(blobs[IMAGE_EXT])} bytes != manifest {nbytes}")
            size = _check_image(blobs[IMAGE_EXT])
            if isinstance(size, str):
                problems.append(f"{where} key {key}: image {size}")
            elif size != (width, height):
                problems.append(f"{where} key {key}: image {size[0]}x{size[1]} != manifest {width}x{height}")
    if listed is not None:
        problems = _check_listed(where, listed, hashed, len(keys)) + problems
    return len(keys), problems, keys


def _read_parquet(loc: Location, columns: list[str]) -> list[dict]:
    return loc.read_parquet(columns, REPACK).to_pylist()


MANIFEST_COLUMNS = ["key", "split", "shard", "label", "width", "height", "nbytes"]
# Manifest rows turned into Python objects at a time: a fixed cost, whatever the set's size
# (8,192 rows; 65,536 made the peak 33 MB higher). Measured by tests/helpers/verify_memory.py.
MANIFEST_BATCH_ROWS = 8192


def manifest_by_shard(manifest: Location):
    """((split, shard), {key: (label, width, height, nbytes)}) one shard at a time, from
    batches of the manifest: the packer writes a shard's rows together, so memory holds one
    shard's rows, not the manifest's (issue 23: 782 B per row as dicts, 11 GB at 14M). A
    shard whose rows come apart is yielded once per run of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.location import corrupt_file

    try:
        with manifest.fs.open_input_file(manifest.path) as f:
            current, rows = None, {}
            for batch in _batches(pq.ParquetFile(f)):
                cols = [batch.column(c).to_pylist() for c in MANIFEST_COLUMNS]
                for key, split, shard, label, width, height, nbytes in zip(*cols, strict=True):
                    if (split, shard) != current:
                        if current is not None:
                            yield current, rows
                        current, rows = (split, shard), {}
                    rows[key] = (label, width, height, nbytes)
            if current is not None:
                yield current, rows
    except pa.ArrowException as err:
        raise corrupt_file(manifest.uri, err, REPACK) from None


def _batches(parquet):
    """The manifest's columns in batches, one row group at a time: a reader over the whole file
    keeps every row group's pre-buffered bytes until it ends (~11 B per row, growing with the
    manifest: the packer writes a row group per shard), one per row group frees them as it goes
    and still reads each row group in one coalesced request."""
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=MANIFEST_COLUMNS, row_groups=[group])


def verify(shards_dir: str | os.PathLike, workers: int | None = None) -> VerifyReport:
    """Check the shard set at `shards_dir` (a path or a URI), one shard at a time: the
    manifest is streamed shard by shard and at most a few shards' rows are in flight, so
    memory stays flat in the set's size."""
    root = resolve(shards_dir)
    check_reachable(root)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest.uri}: not found; is {root.uri} a shard directory (python -m shards build)?")
    listing = root / SHARDS_FILE
    listed = ({(r["split"], r["shard"]): (r["bytes"], r["samples"], r["sha256"])
               for r in _read_parquet(listing, ["split", "shard", "bytes", "samples", "sha256"])}
              if listing.is_file() else None)
    stored = {(split, f.base_name) for split in SPLITS for f in (root / split).list()
              if f.type == pafs.FileType.File and f.base_name.endswith(TAR_SUFFIX) and not f.base_name.startswith(".")}
    report = VerifyReport(shards=len(stored))
    if listed is not None:
        report.problems += [f"{split}/{name}: not listed in {SHARDS_FILE}" for split, name in sorted(stored)
                            if (split, name) not in listed]
        report.problems += [f"{split}/{name}: listed in {SHARDS_FILE} but missing" for split, name in sorted(listed)
                            if (split, name) not in stored]
    done: set[tuple[str, str]] = set()

    def jobs():
        for (split, name), expected in manifest_by_shard(manifest):
            if (split, name) not in stored:
                report.problems.extend(f"{split}/{name} key {k}: in the manifest but the shard is missing"
                                       for k in sorted(expected)[:20])
                continue
            done.add((split, name))
            yield _job(root, split, name, expected, listed)
        for split, name in sorted(stored - done):  # tars the manifest does not name
            yield _job(root, split, name, {}, listed)

    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(stored) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(stored))) as pool:
            for job, result in _bounded(pool, jobs(), 2 * workers):
                _merge(report, job, result)
    else:
        for job in jobs():
            _merge(report, job, check_shard(job))
    if not stored:
        report.problems.append(f"{root.uri}: no shards under train/ or val/")
    return report


def _job(root: Location, split: str, name: str, expected: dict, listed: dict | None) -> tuple:
    return ((root / split / name).uri, f"{split}/{name}", expected,
            None if listed is None else listed.get((split, name)))


def _bounded(pool, jobs, depth: int):
    """(job, result) in order, with at most `depth` jobs submitted ahead of the results read."""
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append((job, pool.apply_async(check_shard, (job,))))
        if len(pending) >= depth:
            done_job, res = pending.popleft()
            yield done_job, res.get()
    while pending:
        done_job, res = pending.popleft()
        yield done_job, res.get()


def _merge(report: VerifyReport, job: tuple, result: tuple[int, list[str], list[str]]) -> None:
    _, where, expected, _ = job
    n, problems, keys = result
    report.samples += n
    report.problems += problems
    report.problems += [f"{where} key {k}: appears {c} times" for k, c in Counter(keys).items() if c > 1]
    left = set(expected) - set(keys)
    report.problems += [f"{where} key {k}: in the manifest but not in the shard" for k in sorted(left)]
