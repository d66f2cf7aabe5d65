"""ImageNet tree -> WebDataset shards with DALI indices, manifest, rejects, classes and stats.

`out` is a path or a URI (`s3://bucket/prefix`); a remote one is packed in a local work
directory and each shard is uploaded as soon as it is sealed (shards/output.py).

Resumable: after each shard is published, its record (sample rows, rejects, pixel sums of its
span of the plan, size and sha256 of its tar) is saved under `OUT/.pack/`. A re-run with the
same source and settings keeps the published shards, re-encodes from the end of the last one,
and writes the same bytes as an uninterrupted run (the plan, encoding and tar headers are
deterministic). The set files (rejects, classes, stats, shards.parquet, then manifest.parquet)
are written last.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.pool import Pool
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shards.encode import Encoded, encode_job
from shards.layouts import CLASSES_FILE, MANIFEST_FILE, REJECTS_FILE, SHARDS_FILE, SPLITS, STATS_FILE, shard_name
from shards.location import is_remote, is_uri, resolve
from shards.output import PackOutput
from shards.sources import Item, SourceTree, discover
from shards.stats import PixelMoments
from shards.writer import ShardWriter

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
    ("wnid", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("nbytes", pa.int64()),
    ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("split", pa.string()), ("reason", pa.string())])
SHARDS_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.string()), ("bytes", pa.int64()),
                           ("samples", pa.int64()), ("sha256", pa.string())])


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

    def line(self) -> str:
        text = (f"packed {self.packed} images, rejected {self.rejected}, {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {self.wall_s:.1f} s")
        if self.remote:
            rate = self.upload_bytes / 1e6 / self.upload_s if self.upload_s > 0 else 0.0
            text += (f"; uploaded {self.uploaded} shards ({self.upload_bytes / 1e6:.1f} MB at {rate:.1f} MB/s), "
                     f"{self.kept} already there")
        return text


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


def _plan(tree: SourceTree, split: str, seed: int) -> tuple[list[Item], list[tuple[str, str, str]]]:
    """The split's encode order (train: one global seeded shuffle) and its label rejects."""
    known = set(tree.wnids)
    plan, rejects = [], []
    for item in tree.items[split]:
        if item.wnid is None:
            rejects.append((item.source, split, "no label: not listed in the val labels file"))
        elif item.wnid not in known:
            rejects.append((item.source, split, f"unknown class {item.wnid} (not a train/ folder)"))
        else:
            plan.append(item)
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(plan))
        plan = [plan[i] for i in order]
    return plan, rejects


def _fingerprint(tree: SourceTree, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in sorted(tree.items):
        for item in tree.items[split]:
            h.update(f"{split}\0{item.source}\0{item.wnid}\0{item.key}\n".encode())
    for r in tree.rejects:
        h.update(("\0".join(r) + "\n").encode())
    return h.hexdigest()


def _encode_stream(jobs: list[tuple], pool: Pool | None) -> Iterator[tuple[int, Encoded | str]]:
    if pool is None or len(jobs) < 2:
        return map(encode_job, jobs)
    return pool.imap(encode_job, jobs, chunksize=8)


def _die_with_parent() -> None:
    """Pool workers get SIGKILL when the packer dies (even by SIGKILL), so no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pack_split(tree: SourceTree, output: PackOutput, split: str, plan: list[Item], records: list[dict],
                shorter_side: int, quality: int, pool: Pool | None, limit: int, bar: tqdm, rates: dict) -> list[dict]:
    """Encode and write the plan of one split from where the published shards (`records`) end."""
    split_dir = output.shard_dir(split)
    records = list(records)
    start = records[-1]["end"] if records else 0
    jobs = [(str(tree.root / it.source), it.key, shorter_side, quality, split == "train") for it in plan[start:]]
    writer: ShardWriter | None = None
    rec = None
    for pos, (in_bytes, res) in enumerate(_encode_stream(jobs, pool), start):
        item = plan[pos]
        if rec is None:
            rec = {"start": pos, "rows": [], "rejects": [], "moments": PixelMoments()}
        if isinstance(res, str):
            rec["rejects"].append([item.source, split, res])
        else:
            if writer is None:
                writer = ShardWriter(split_dir, shard_name(len(records)))
            label = tree.label(item.wnid)
            writer.add(item.key, res.jpeg, label)
            rec["rows"].append([item.key, split, writer.tar_path.name, label, item.wnid, res.width,
                                res.height, len(res.jpeg), item.source])
            rec["moments"].add(res.count, res.sum or (0, 0, 0), res.outer or (0,) * 9)
        rates["in"] += in_bytes
        rates["out"] += len(res.jpeg) if not isinstance(res, str) else 0
        bar.update(1)
        bar.set_postfix_str(f"in {rates['in'] / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s, "
                            f"out {rates['out'] / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s"
                            + (f", uploaded {output.uploads.shards} shards" if output.remote else ""), refresh=False)
        if writer is not None and writer.nbytes >= limit:
            records.append(_seal(output, split, writer, rec, pos + 1))
            writer, rec = None, None
    if writer is not None:
        records.append(_seal(output, split, writer, rec, len(plan)))
    elif rec is not None:  # trailing rejects after the last shard: kept in a shard-less record
        records.append({"start": rec["start"], "end": len(plan), "shard": None, "bytes": 0, "samples": 0, "rows": [],
                        "rejects": rec["rejects"], "moments": PixelMoments().to_json()})
    return records


def _seal(output: PackOutput, split: str, writer: ShardWriter, rec: dict, end: int) -> dict:
    size = writer.publish()
    record = {"start": rec["start"], "end": end, "shard": writer.tar_path.name, "bytes": size,
              "samples": writer.samples, "sha256": writer.sha256,
              "rows": rec["rows"], "rejects": rec["rejects"], "moments": rec["moments"].to_json()}
    output.commit(split, writer.tar_path, writer.idx_path, record)
    return record


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_outputs(output: PackOutput, tree: SourceTree, splits: tuple[str, ...], records: dict[str, list[dict]],
                   pre_rejects: list[tuple[str, str, str]]) -> tuple[int, int, int, int]:
    rows = [r for s in splits for rec in records[s] for r in rec["rows"]]
    rejects = pre_rejects + [tuple(r) for s in splits for rec in records[s] for r in rec["rejects"]]
    shard_rows = [(s, rec["shard"], rec["bytes"], rec["samples"], rec["sha256"])
                  for s in splits for rec in records[s] if rec["shard"]]
    files = {REJECTS_FILE: _parquet(pa.Table.from_pylist([dict(zip(REJECTS_SCHEMA.names, r)) for r in rejects],
                                                         schema=REJECTS_SCHEMA))}
    classes = [{"index": i, "wnid": w, "name": tree.names.get(w, w)} for i, w in enumerate(tree.wnids)]
    files[CLASSES_FILE] = (json.dumps(classes, indent=1) + "\n").encode()
    if "train" in splits:
        moments = PixelMoments()
        for rec in records["train"]:
            moments.add(rec["moments"]["count"], rec["moments"]["sum"], rec["moments"]["outer"])
        files[STATS_FILE] = (json.dumps(moments.stats(), indent=1) + "\n").encode()
    files[SHARDS_FILE] = _parquet(pa.Table.from_pylist([dict(zip(SHARDS_SCHEMA.names, r)) for r in shard_rows],
                                                       schema=SHARDS_SCHEMA))
    files[MANIFEST_FILE] = _parquet(pa.Table.from_pylist([dict(zip(MANIFEST_SCHEMA.names, r)) for r in rows],
                                                         schema=MANIFEST_SCHEMA))
    for name, data in files.items():  # manifest.parquet last: a reader that finds it finds the whole set
        output.write(name, data)
    shards = len(shard_rows)
    nbytes = sum(rec["bytes"] for s in splits for rec in records[s])
    return len(rows), len(rejects), shards, nbytes


def _local_source(source: str | os.PathLike) -> Path:
    if is_remote(source):
        raise ValueError(f"--source {source}: must be a local directory; copy the tree locally first "
                         f"(e.g. aws s3 sync {source} /data/imagenet) and pass that path")
    return (resolve(source).local_path() if is_uri(source) else Path(source)).resolve()


def build(source: str | os.PathLike, out: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"),
          shorter_side: int = 256, quality: int = 90, workers: int | None = None, shard_size_mb: float = 256,
          seed: int = 0, overwrite: bool = False, progress: bool = True,
          work_dir: str | os.PathLike | None = None) -> PackSummary:
    """Pack `source` (a local ImageNet tree) into `out`, a path or a URI (DESIGN.md "Shard
    output"); a remote `out` is packed in `work_dir` (default `~/.cache/alexnet-dali/pack/...`)."""
    t0 = time.perf_counter()
    splits = tuple(splits)
    _check_settings(shorter_side, quality, workers, shard_size_mb, splits)
    source = _local_source(source)
    output = PackOutput.open(out, work_dir)  # a remote out's bucket is checked here, before any work
    try:
        tree = discover(source, splits)
        settings = {"source": str(source), "splits": list(splits), "shorter_side": shorter_side,
                    "quality": quality, "shard_size_mb": float(shard_size_mb), "seed": seed, "classes": tree.wnids}
        state = output.prepare(_fingerprint(tree, settings), settings, overwrite)
        summary = _pack(tree, output, splits, shorter_side, quality, workers, shard_size_mb, seed, progress)
        state["complete"] = True
        output.save_state(state)
    finally:
        output.close()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _pack(tree: SourceTree, output: PackOutput, splits: tuple[str, ...], shorter_side: int, quality: int,
          workers: int | None, shard_size_mb: float, seed: int, progress: bool) -> PackSummary:
    pre_rejects = [r for r in tree.rejects if r[1] in splits]
    plans = {}
    for split in splits:
        plans[split], label_rejects = _plan(tree, split, seed)
        pre_rejects += label_rejects
    workers = workers or os.cpu_count() or 1
    limit = int(shard_size_mb * 1024 * 1024)
    done = {split: output.records(split) for split in splits}
    records: dict[str, list[dict]] = {}
    todo = sum(len(plans[s]) - (done[s][-1]["end"] if done[s] else 0) for s in splits)
    rates = {"in": 0, "out": 0}
    # one pool for all splits; workers die with the packer (no orphans after a SIGKILL)
    pool = mp.get_context("spawn").Pool(workers, initializer=_die_with_parent) if workers > 1 and todo > 1 else None
    try:
        with tqdm(total=todo, unit="img", desc=f"packing {output.loc.uri}", disable=not progress or todo == 0,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            for split in splits:
                records[split] = _pack_split(tree, output, split, plans[split], done[split], shorter_side,
                                             quality, pool, limit, bar, rates)
        upload_s = output.wait_uploads()  # every shard is in place before the set files
        counts = _write_outputs(output, tree, splits, records, pre_rejects)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"{output.work}: disk full; free space and re-run the same command "
                                        "(it resumes from the last complete shard)") from None
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return PackSummary(*counts, wall_s=0.0, remote=output.remote, kept=sum(len(d) for d in done.values()),
                       uploaded=output.uploads.shards, upload_bytes=output.uploads.bytes, upload_s=upload_s)
