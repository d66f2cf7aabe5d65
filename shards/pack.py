"""ImageNet tree -> WebDataset shards with DALI indices, manifest, rejects, classes and stats.

`out` is a path or a URI (`s3://bucket/prefix`); a remote one is packed in a local work
directory and each shard is uploaded as soon as it is sealed (shards/output.py).

Resumable: after each shard is published, its part (the shard's manifest rows and rejects,
Parquet) and its record (span of the plan, pixel sums, size and sha256 of its tar) are saved
under `OUT/.pack/`. A re-run with the same source and settings keeps the published shards,
re-encodes from the end of the last one, and writes the same bytes as an uninterrupted run
(the plan, encoding and tar headers are deterministic). The set files (rejects, classes,
stats, shards.parquet, then manifest.parquet) are written last, streamed from the parts (one
row group per shard), so the packer's memory does not grow with the manifest.

A re-run also retries the inputs an earlier run could not read (reasons "unreadable: ..."):
when one reads now, the journal is cut back to the shard that held it and packing resumes
from there, so the result equals an uninterrupted run with the file readable.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from shards.encode import UNREADABLE, encode_job, read_source
from shards.layouts import (
    CLASSES_FILE,
    MANIFEST_FILE,
    REJECTS_FILE,
    SHARDS_FILE,
    SPLITS,
    STATS_FILE,
    display_path,
    shard_name,
)
from shards.listing import Item, Listing, write_plan
from shards.location import is_remote, is_uri, resolve
from shards.output import PackOutput
from shards.sources import SourceTree, discover
from shards.stats import PixelMoments
from shards.upload import Uploader
from shards.workers import EncoderPool, WorkerDied
from shards.writer import ShardWriter

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
    ("wnid", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("nbytes", pa.int64()),
    ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("split", pa.string()), ("reason", pa.string())])
SHARDS_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.string()), ("bytes", pa.int64()),
                           ("samples", pa.int64()), ("sha256", pa.string())])
# A shard's part in the journal: its manifest rows (reason null) and its rejects, in plan order.
PART_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [("reason", pa.string())])
CHUNK = 8  # images per job sent to a worker
# The disk-full estimate: bytes of the journal part and manifest row of one image, the files
# of a shard (tar, index, part, record) and the filesystem block each file may leave unused.
SET_BYTES_PER_IMAGE, FILES_PER_SHARD, BLOCK_SLACK = 300, 4, 4096


@dataclass
class PackSummary:
    packed: int
    rejected: int
    shards: int
    bytes: int
    wall_s: float
    remote: bool = False
    kept: int = 0  # shards already published by an earlier run
    uploaded: int = 0  # shards uploaded by this run (remote outputs)
    upload_bytes: int = 0
    upload_s: float = 0.0
    retried: int = 0  # inputs an earlier run could not read that this run tried again

    def line(self) -> str:
        text = (f"packed {self.packed} images, rejected {self.rejected}, {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {self.wall_s:.1f} s")
        if self.retried:
            text += f"; retried {self.retried} inputs an earlier run could not read"
        if self.remote:
            rate = self.upload_bytes / 1e6 / self.upload_s if self.upload_s > 0 else 0.0
            text += (f"; uploaded {self.uploaded} shards ({self.upload_bytes / 1e6:.1f} MB at {rate:.1f} MB/s), "
                     f"{self.kept} already there")
        return text


class DiskFull(OSError):
    """The output (or work) directory ran out of space; one line with the space needed."""

    def __str__(self) -> str:
        return str(self.strerror)


def _check_settings(shorter_side: int, quality: int, workers: int | None, shard_size_mb: float,
                    splits: tuple[str, ...]) -> None:
    if shorter_side < 0:
        raise ValueError(f"--shorter-side must be >= 0 (0 keeps the original size), got {shorter_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be between 1 and 100, got {quality}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not shard_size_mb > 0:
        raise ValueError(f"--shard-size-mb must be > 0, got {shard_size_mb}")
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"--splits must name some of {','.join(SPLITS)} once each, got {','.join(splits)}")


def _plan(tree: SourceTree, split: str, seed: int) -> tuple[Listing, list[tuple[str, str, str]]]:
    """The split's encode order (train: one global seeded shuffle) and its label rejects. The
    plan is a listing of its own beside the split's (val with every item labelled: the same
    one); it takes 8 bytes per item while it is written, none after."""
    listing = tree.items[split]
    rejects: list[tuple[str, str, str]] = []
    positions = None  # every item, in listing order
    if not listing.labelled():
        codes = listing.table()["code"].to_numpy()
        labelled = (codes >= 0) & (codes < listing.known)
        del codes
        for pos in np.flatnonzero(~labelled).tolist():
            item = listing[pos]
            rejects.append((item.source, split, "no label: not listed in the val labels file" if item.wnid is None
                            else f"unknown class {item.wnid} (not a train/ folder)"))
        positions = np.flatnonzero(labelled)
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(listing) if positions is None else len(positions))
        positions = order if positions is None else positions[order]
        del order
    if positions is None:
        return listing, rejects
    return write_plan(listing, positions, tree.spill_dir / f"{split}-plan.arrow"), rejects


def _fingerprint(tree: SourceTree, settings: dict) -> str:
    """sha256 of the settings, every listed item (split, source, wnid, key) and every reject,
    streamed from the listings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in sorted(tree.items):
        listing = tree.items[split]
        prefix = split.encode() + b"\0"
        wnids = [w.encode("utf-8", "surrogateescape") + b"\0" for w in listing.wnids]
        unlabelled = b"None\0"
        for batch in listing.batches():
            for source, code, key in zip(batch["source"].to_pylist(), batch["code"].to_pylist(),
                                         batch["key"].to_pylist()):
                h.update(b"".join((prefix, source, b"\0", wnids[code] if code >= 0 else unlabelled,
                                   key.encode(), b"\n")))
    for r in tree.rejects:
        h.update(("\0".join(r) + "\n").encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class _Progress:
    """The bar, its rates and what the disk-full estimate needs; refreshed twice a second."""

    def __init__(self, total: int, desc: str, enabled: bool, remote_uploads=None) -> None:
        self.bar = tqdm(total=total, unit="img", desc=desc, disable=not enabled or total == 0, mininterval=0.5,
                        dynamic_ncols=True)
        self.in_bytes = self.out_bytes = self.packed = self.done = 0
        self._uploads = remote_uploads
        self._shown = 0.0

    def update(self, in_bytes: int, out_bytes: int, packed: bool) -> None:
        self.in_bytes += in_bytes
        self.out_bytes += out_bytes
        self.packed += packed
        self.done += 1
        self.bar.update(1)
        now = time.monotonic()
        if now - self._shown >= 0.5 and not self.bar.disable:
            self._shown = now
            elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
            self.bar.set_postfix_str(f"in {self.in_bytes / 1e6 / elapsed:.1f} MB/s, out "
                                     f"{self.out_bytes / 1e6 / elapsed:.1f} MB/s"
                                     + (f", uploaded {self._uploads.shards} shards" if self._uploads else ""),
                                     refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Part:
    """The manifest rows and rejects of one shard's span of the plan, as columns."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.cols: dict[str, list] = {name: [] for name in PART_SCHEMA.names}
        self.count, self.sum, self.outer = 0, [0.0] * 3, [0.0] * 9  # pixel moments, summed in plan order
        self.unreadable: list[int] = []  # plan positions of the inputs that could not be read

    def row(self, item: Item, split: str, shard: str, label: int, width: int, height: int, nbytes: int) -> None:
        for name, value in zip(PART_SCHEMA.names, (item.key, split, shard, label, item.wnid, width, height, nbytes,
                                                   display_path(item.source), None)):
            self.cols[name].append(value)

    def reject(self, item: Item, split: str, reason: str, pos: int) -> None:
        for name in PART_SCHEMA.names:
            self.cols[name].append(None)
        self.cols["split"][-1] = split
        self.cols["source"][-1] = display_path(item.source)
        self.cols["reason"][-1] = reason
        if reason.startswith(UNREADABLE):
            self.unreadable.append(pos)

    def add_moments(self, count: int, s: tuple, outer: tuple) -> None:
        self.count += count
        self.sum = [a + b for a, b in zip(self.sum, s)]
        self.outer = [a + b for a, b in zip(self.outer, outer)]

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=PART_SCHEMA)

    def record(self, end: int, shard: str | None, nbytes: int, samples: int, sha256: str | None) -> dict:
        return {"start": self.start, "end": end, "shard": shard, "bytes": nbytes, "samples": samples,
                "sha256": sha256, "moments": {"count": self.count, "sum": self.sum, "outer": self.outer},
                "unreadable": self.unreadable}


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _pack_split(tree: SourceTree, output: PackOutput, split: str, plan: Listing, records: list[dict],
                shorter_side: int, quality: int, pool: EncoderPool | None, limit: int, progress: _Progress,
                timing: dict) -> None:
    """Encode and write the plan of one split from where the published shards (`records`)
    end; appends the record of each shard it seals to `records`, as it seals it."""
    split_dir = output.shard_dir(split)
    start = records[-1]["end"] if records else 0
    want_stats = split == "train"
    root = str(tree.root)
    jobs = ((os.path.join(root, it.source), it.key, tree.label(it.wnid), shorter_side, quality, want_stats)
            for it in plan.items(start))
    items = plan.items(start)  # in step with the results
    results: Iterator = (pool.imap(jobs, CHUNK, name=lambda job: display_path(job[0])) if pool is not None
                         else map(encode_job, jobs))
    writer: ShardWriter | None = None
    part = _Part(start)
    sealer = None if output.remote else Uploader(pending=1)  # a remote output's uploader already overlaps
    try:
        for pos, (in_bytes, res) in enumerate(results, start):
            t = time.perf_counter()
            item = next(items)
            if isinstance(res, str):
                part.reject(item, split, res, pos)
                progress.update(in_bytes, 0, False)
                continue
            blob, members, width, height, nbytes, count, s, o = res
            if writer is None:
                writer = ShardWriter(split_dir, shard_name(len(records)))
            writer.add_blob(blob, members)
            part.row(item, split, writer.tar_path.name, tree.label(item.wnid), width, height, nbytes)
            if count:
                part.add_moments(count, s, o)
            progress.update(in_bytes, nbytes, True)
            if writer.nbytes >= limit:
                records.append(_seal(output, split, writer, part, pos + 1, sealer))
                writer, part = None, _Part(pos + 1)
            timing["write_s"] += time.perf_counter() - t
        if writer is not None:
            records.append(_seal(output, split, writer, part, len(plan), sealer))
            writer = None
        elif part.cols["source"]:  # trailing rejects after the last shard: a shard-less record, not journaled
            rec = part.record(len(plan), None, 0, 0, None)
            rec["table"] = part.table()
            records.append(rec)
        if sealer is not None:
            sealer.close()  # every shard of the split committed (or its error raised here)
    except BaseException:
        if writer is not None:
            writer.discard()  # no half-written shard is left behind (a full disk gets its space back)
        if sealer is not None:
            sealer.close(raise_errors=False)
        raise


def _seal(output: PackOutput, split: str, writer: ShardWriter, part: _Part, end: int,
          sealer: Uploader | None) -> dict:
    """Finish the shard and commit it: on `sealer`'s thread when given (a local output: the
    fsyncs and journal writes run while the next shard fills, so the workers never wait on
    the disk), else here. Its record is returned at once (size and sha256 are known)."""
    record = part.record(end, writer.tar_path.name, writer.finish(), writer.samples, writer.sha256)
    table = part.table()

    def commit() -> None:
        try:
            output.commit(split, writer, record, _parquet(table))
        except BaseException:
            writer.discard()
            raise

    if sealer is None:
        commit()
    else:
        sealer.submit(commit)
    return record


class _TableSink:
    """A Parquet set file written to a local temp file one row group per shard part, so the
    merge holds one part at a time."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema, self.rows = path, schema, 0
        self._writer = pq.ParquetWriter(str(path), schema)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()


def _part_table(output: PackOutput, split: str, rec: dict) -> pa.Table:
    if "table" in rec:
        return rec["table"]
    if "rows" in rec:  # a journal written before parts: rows and rejects inside the record
        rows = [dict(zip(MANIFEST_SCHEMA.names, r), reason=None) for r in rec["rows"]]
        rows += [{"source": r[0], "split": r[1], "reason": r[2]} for r in rec.get("rejects", [])]
        return pa.Table.from_pylist(rows, schema=PART_SCHEMA)
    return output.read_part(split, rec["shard"])


def _write_outputs(output: PackOutput, tree: SourceTree, splits: tuple[str, ...], records: dict[str, list[dict]],
                   pre_rejects: list[tuple[str, str, str]]) -> tuple[int, int, int, int]:
    shard_rows = [(s, rec["shard"], rec["bytes"], rec["samples"], rec["sha256"])
                  for s in splits for rec in records[s] if rec["shard"]]
    sinks = {name: _TableSink(output.set_file_tmp(name), schema)
             for name, schema in ((MANIFEST_FILE, MANIFEST_SCHEMA), (REJECTS_FILE, REJECTS_SCHEMA))}
    try:
        sinks[REJECTS_FILE].add(pa.table({"source": [display_path(r[0]) for r in pre_rejects],
                                          "split": [r[1] for r in pre_rejects],
                                          "reason": [r[2] for r in pre_rejects]}, schema=REJECTS_SCHEMA))
        for split in splits:
            for rec in records[split]:  # one part in memory at a time
                part = _part_table(output, split, rec)
                packed = pc.is_null(part["reason"])
                sinks[MANIFEST_FILE].add(part.filter(packed))
                sinks[REJECTS_FILE].add(part.filter(pc.invert(packed)))
        for sink in sinks.values():
            sink.close()
        files = {CLASSES_FILE: (json.dumps([{"index": i, "wnid": w, "name": tree.names.get(w, w)}
                                            for i, w in enumerate(tree.wnids)], indent=1) + "\n").encode()}
        if "train" in splits:
            moments = PixelMoments()
            for rec in records["train"]:
                moments.add(rec["moments"]["count"], rec["moments"]["sum"], rec["moments"]["outer"])
            files[STATS_FILE] = (json.dumps(moments.stats(), indent=1) + "\n").encode()
        files[SHARDS_FILE] = _parquet(pa.Table.from_pylist([dict(zip(SHARDS_SCHEMA.names, r)) for r in shard_rows],
                                                           schema=SHARDS_SCHEMA))
        output.publish_file(REJECTS_FILE, sinks[REJECTS_FILE].path)
        for name, data in files.items():
            output.write(name, data)
        output.publish_file(MANIFEST_FILE, sinks[MANIFEST_FILE].path)  # last: a reader that finds it finds the set
    finally:
        for sink in sinks.values():
            sink.path.unlink(missing_ok=True)
    nbytes = sum(rec["bytes"] for s in splits for rec in records[s])
    return sinks[MANIFEST_FILE].rows, sinks[REJECTS_FILE].rows, len(shard_rows), nbytes


def _local_source(source: str | os.PathLike) -> Path:
    if is_remote(source):
        raise ValueError(f"--source {source}: must be a local directory; copy the tree locally first "
                         f"(e.g. aws s3 sync {source} /data/imagenet) and pass that path")
    return (resolve(source).local_path() if is_uri(source) else Path(source)).resolve()


def build(source: str | os.PathLike, out: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"),
          shorter_side: int = 256, quality: int = 90, workers: int | None = None, shard_size_mb: float = 256,
          seed: int = 0, overwrite: bool = False, progress: bool = True,
          work_dir: str | os.PathLike | None = None, profile: dict | None = None) -> PackSummary:
    """Pack `source` (a local ImageNet tree) into `out`, a path or a URI (DESIGN.md "Shard
    output"); a remote `out` is packed in `work_dir` (default `~/.cache/alexnet-dali/pack/...`).
    `profile`, when given, receives where the packer's time went (seconds)."""
    t0 = time.perf_counter()
    splits = tuple(splits)
    _check_settings(shorter_side, quality, workers, shard_size_mb, splits)
    source = _local_source(source)
    output = PackOutput.open(out, work_dir)  # a remote out's bucket is checked here, before any work
    workers = workers or os.cpu_count() or 1
    pool = tree = None
    ok = False
    try:
        # the workers start (import PIL, numpy) while this process lists the tree
        pool = EncoderPool(workers, encode_job) if workers > 1 else None
        # the item lists are spilled to disk: a remote output's work directory, else $TMPDIR
        tree = discover(source, splits, spill_dir=output.work if output.remote else None)
        settings = {"source": str(source), "splits": list(splits), "shorter_side": shorter_side,
                    "quality": quality, "shard_size_mb": float(shard_size_mb), "seed": seed, "classes": tree.wnids}
        t_discovered = time.perf_counter()
        state = output.prepare(_fingerprint(tree, settings), settings, overwrite)
        summary = _pack(tree, output, splits, shorter_side, quality, pool, shard_size_mb, seed, progress, profile)
        state["complete"] = True
        output.save_state(state)
        ok = True
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
            raise DiskFull(errno.ENOSPC, f"{output.work}: disk full ({_free_mb(output.work):.1f} MB free); free "
                                         "space and re-run the same command") from None
        raise
    finally:
        if pool is not None and ok:
            pool.close()
        elif pool is not None:
            pool.kill()
        if tree is not None:
            tree.close()
        output.close()
    summary.wall_s = time.perf_counter() - t0
    if profile is not None:
        profile.update(discover_s=t_discovered - t0, wall_s=summary.wall_s)
        if pool is not None:
            profile.update(wait_s=pool.wait_s, recv_s=pool.recv_s, workers_idle_s=pool.idle_s,
                           workers_cpu_s=pool.cpu_s)
    return summary


def _free_mb(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free / 1e6
    except OSError:
        return 0.0


def _readable(path: str) -> bool:
    return not isinstance(read_source(path, retry_delays=()), str)


def _retry_unreadable(tree: SourceTree, output: PackOutput, plans: dict[str, Listing],
                      done: dict[str, list[dict]]) -> int:
    """Cut each split's journal back to its first shard holding an input that could not be
    read before and reads now; returns how many such inputs will be tried again."""
    retried = 0
    for split, recs in done.items():
        for i, rec in enumerate(recs):
            now = [p for p in rec.get("unreadable", []) if _readable(os.path.join(tree.root, plans[split][p].source))]
            if now:
                retried += sum(len(r.get("unreadable", [])) for r in recs[i:])
                output.uncommit(split, recs[i:])
                done[split] = recs[:i]
                break
    return retried


def _pack(tree: SourceTree, output: PackOutput, splits: tuple[str, ...], shorter_side: int, quality: int,
          pool: EncoderPool | None, shard_size_mb: float, seed: int, progress: bool,
          profile: dict | None) -> PackSummary:
    pre_rejects = [r for r in tree.rejects if r[1] in splits]
    plans = {}
    for split in splits:
        plans[split], label_rejects = _plan(tree, split, seed)
        pre_rejects += label_rejects
    limit = int(shard_size_mb * 1024 * 1024)
    done = {split: output.records(split) for split in splits}
    retried = _retry_unreadable(tree, output, plans, done)
    records: dict[str, list[dict]] = {}
    todo = sum(len(plans[s]) - (done[s][-1]["end"] if done[s] else 0) for s in splits)
    bar = _Progress(todo, f"packing {output.loc.uri}", progress, output.uploads if output.remote else None)
    timing = {"write_s": 0.0}
    try:
        for split in splits:
            records[split] = list(done[split])
            _pack_split(tree, output, split, plans[split], records[split], shorter_side, quality,
                        pool if todo > 1 else None, limit, bar, timing)
        upload_s = output.wait_uploads()  # every shard is in place before the set files
        t = time.perf_counter()
        counts = _write_outputs(output, tree, splits, records, pre_rejects)
        timing["outputs_s"] = time.perf_counter() - t
    except WorkerDied as e:  # (an OSError: first)
        raise WorkerDied(f"{e}; the shards sealed before it are kept: re-run the same command to resume (if a "
                         "worker dies again at the same files, pass fewer --workers or move those files out)") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(output, plans, {**done, **records}, bar, limit) from None
        raise
    finally:
        bar.close()
    if profile is not None:
        profile.update(timing, images=bar.done, in_bytes=bar.in_bytes, out_bytes=bar.out_bytes)
    return PackSummary(*counts, wall_s=0.0, remote=output.remote, kept=sum(len(d) for d in done.values()),
                       uploaded=output.uploads.shards, upload_bytes=output.uploads.bytes, upload_s=upload_s,
                       retried=retried)


def _disk_full(output: PackOutput, plans: dict[str, Listing], records: dict[str, list[dict]],
               bar: _Progress, limit: int) -> DiskFull:
    """One line: where, how much is free, and about how much more the rest needs."""
    free = _free_mb(output.work)
    if output.remote:
        return DiskFull(errno.ENOSPC, f"{output.work}: disk full in the work directory ({free:.1f} MB free); it "
                                      f"needs room for two shards (about {2 * limit / 1e6:.0f} MB): free space or "
                                      "pass another --work-dir, then re-run the same command")
    sealed = [rec for recs in records.values() for rec in recs if rec.get("shard")]
    samples = sum(rec["samples"] for rec in sealed)
    per_image = (sum(rec["bytes"] for rec in sealed) / samples if samples
                 else bar.out_bytes / bar.packed if bar.packed else 0.0)
    left = sum(len(plans[s]) - (records[s][-1]["end"] if records.get(s) else 0) for s in plans)
    shards_left = math.ceil(left * per_image / limit) if limit else 0
    # + one shard: the one whose commit failed may already count as done in `records`
    need = 1.1 * (left * per_image + limit + sum(len(p) for p in plans.values()) * SET_BYTES_PER_IMAGE
                  + (shards_left + 2) * FILES_PER_SHARD * BLOCK_SLACK)
    return DiskFull(errno.ENOSPC, f"{output.work}: disk full ({free:.1f} MB free); about {need / 1e6:.1f} MB more "
                                  f"are needed to finish ({left} images left, about {per_image / 1e3:.1f} KB each): "
                                  "free space and re-run the same command (it resumes from the last complete shard)")
