"""ImageNet tree -> WebDataset shards with DALI indices, manifest, rejects, classes and stats.

Resumable: after each shard is published, its record (sample rows, rejects and pixel sums
of its span of the plan) is saved under `OUT/.pack/`. A re-run with the same source and
settings keeps the published shards, re-encodes from the end of the last one, and writes
the same bytes as an uninterrupted run (the plan, encoding and tar headers are
deterministic). The manifest, rejects, classes and stats files are written last.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import shutil
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
from shards.index import atomic_write_bytes
from shards.layouts import (
    CLASSES_FILE, IDX_SUFFIX, MANIFEST_FILE, PACK_DIR, REJECTS_FILE, SPLITS, STATS_FILE, TAR_SUFFIX, shard_name,
)
from shards.sources import Item, SourceTree, discover
from shards.stats import PixelMoments
from shards.writer import ShardWriter

STATE_FILE = "state.json"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
    ("wnid", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("nbytes", pa.int64()),
    ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("split", pa.string()), ("reason", pa.string())])


@dataclass
class PackSummary:
    packed: int
    rejected: int
    shards: int
    bytes: int
    wall_s: float

    def line(self) -> str:
        return (f"packed {self.packed} images, rejected {self.rejected}, {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {self.wall_s:.1f} s")


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


def _clean(out: Path) -> None:
    """Remove what a packer run writes (and nothing else)."""
    shutil.rmtree(out / PACK_DIR, ignore_errors=True)
    for name in (CLASSES_FILE, MANIFEST_FILE, REJECTS_FILE, STATS_FILE):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        d = out / split
        if d.is_dir():
            for p in d.iterdir():
                if p.name.endswith((TAR_SUFFIX, IDX_SUFFIX, ".tmp")):
                    p.unlink()


def _prepare_out(out: Path, fingerprint: str, settings: dict, overwrite: bool) -> dict | None:
    """Check the output directory; returns the saved state when it may be resumed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pack-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: output not writable ({e.strerror}); fix its permissions or choose another --out") from None
    state_path = out / PACK_DIR / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if overwrite:
        _clean(out)
        return None
    if state is not None and state["fingerprint"] != fingerprint:
        changed = [k for k in settings if state["settings"].get(k) != settings[k]] or ["the source's file list"]
        raise ValueError(
            f"{out}: already holds shards packed from {state['settings']['source']} with other "
            f"settings ({', '.join(changed)} differ); pass --overwrite to replace them or choose another --out"
        )
    if state is None and any(out.iterdir()):
        raise ValueError(f"{out}: not empty and not written by the packer; pass --overwrite or choose an empty --out")
    return state


def _records(out: Path, split: str) -> list[dict]:
    """Records of the split's published shards, in order (a prefix of the plan)."""
    records = []
    while True:
        path = out / PACK_DIR / split / (shard_name(len(records)) + ".json")
        tar = out / split / shard_name(len(records))
        if not (path.is_file() and tar.is_file() and tar.with_suffix(IDX_SUFFIX).is_file()):
            return records
        records.append(json.loads(path.read_text()))


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


def _pack_split(tree: SourceTree, out: Path, split: str, plan: list[Item], shorter_side: int, quality: int,
                pool: Pool | None, limit: int, bar: tqdm, rates: dict) -> list[dict]:
    """Encode and write the plan of one split from where the published shards end."""
    split_dir = out / split
    split_dir.mkdir(exist_ok=True)
    (out / PACK_DIR / split).mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("*.tmp"):
        stale.unlink()
    records = _records(out, split)
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
                            f"out {rates['out'] / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s", refresh=False)
        if writer is not None and writer.nbytes >= limit:
            records.append(_seal(out, split, writer, rec, pos + 1))
            writer, rec = None, None
    if writer is not None:
        records.append(_seal(out, split, writer, rec, len(plan)))
    elif rec is not None:  # trailing rejects after the last shard: kept in a shard-less record
        records.append({"start": rec["start"], "end": len(plan), "shard": None, "bytes": 0, "rows": [],
                        "rejects": rec["rejects"], "moments": PixelMoments().to_json()})
    return records


def _seal(out: Path, split: str, writer: ShardWriter, rec: dict, end: int) -> dict:
    size = writer.publish()
    record = {"start": rec["start"], "end": end, "shard": writer.tar_path.name, "bytes": size,
              "rows": rec["rows"], "rejects": rec["rejects"], "moments": rec["moments"].to_json()}
    atomic_write_bytes(out / PACK_DIR / split / (writer.tar_path.name + ".json"), json.dumps(record).encode())
    return record


def _write_outputs(out: Path, tree: SourceTree, splits: tuple[str, ...], records: dict[str, list[dict]],
                   pre_rejects: list[tuple[str, str, str]]) -> tuple[int, int, int, int]:
    rows = [r for s in splits for rec in records[s] for r in rec["rows"]]
    rejects = pre_rejects + [tuple(r) for s in splits for rec in records[s] for r in rec["rejects"]]
    manifest = pa.Table.from_pylist([dict(zip(MANIFEST_SCHEMA.names, r)) for r in rows], schema=MANIFEST_SCHEMA)
    rej = pa.Table.from_pylist([dict(zip(REJECTS_SCHEMA.names, r)) for r in rejects], schema=REJECTS_SCHEMA)
    for table, name in ((manifest, MANIFEST_FILE), (rej, REJECTS_FILE)):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(out / name, sink.getvalue().to_pybytes())
    classes = [{"index": i, "wnid": w, "name": tree.names.get(w, w)} for i, w in enumerate(tree.wnids)]
    atomic_write_bytes(out / CLASSES_FILE, (json.dumps(classes, indent=1) + "\n").encode())
    if "train" in splits:
        moments = PixelMoments()
        for rec in records["train"]:
            moments.add(rec["moments"]["count"], rec["moments"]["sum"], rec["moments"]["outer"])
        atomic_write_bytes(out / STATS_FILE, (json.dumps(moments.stats(), indent=1) + "\n").encode())
    shards = sum(1 for s in splits for rec in records[s] if rec["shard"])
    nbytes = sum(rec["bytes"] for s in splits for rec in records[s])
    return len(rows), len(rejects), shards, nbytes


def build(source: Path, out: Path, splits: tuple[str, ...] = ("train", "val"), shorter_side: int = 256,
          quality: int = 90, workers: int | None = None, shard_size_mb: float = 256, seed: int = 0,
          overwrite: bool = False, progress: bool = True) -> PackSummary:
    """Pack `source` (an ImageNet tree) into `out` (DESIGN.md "Shard output")."""
    t0 = time.perf_counter()
    splits = tuple(splits)
    _check_settings(shorter_side, quality, workers, shard_size_mb, splits)
    source, out = Path(source).resolve(), Path(out)
    tree = discover(source, splits)
    settings = {"source": str(source), "splits": list(splits), "shorter_side": shorter_side, "quality": quality,
                "shard_size_mb": float(shard_size_mb), "seed": seed, "classes": tree.wnids}
    fingerprint = _fingerprint(tree, settings)
    state = _prepare_out(out, fingerprint, settings, overwrite)
    state_path = out / PACK_DIR / STATE_FILE
    if state is None:
        (out / PACK_DIR).mkdir(exist_ok=True)
        state = {"fingerprint": fingerprint, "settings": settings, "complete": False}
        atomic_write_bytes(state_path, json.dumps(state, indent=1).encode())
    pre_rejects = [r for r in tree.rejects if r[1] in splits]
    plans = {}
    for split in splits:
        plans[split], label_rejects = _plan(tree, split, seed)
        pre_rejects += label_rejects
    workers = workers or os.cpu_count() or 1
    limit = int(shard_size_mb * 1024 * 1024)
    records: dict[str, list[dict]] = {}
    todo = sum(len(plans[s]) - (r[-1]["end"] if (r := _records(out, s)) else 0) for s in splits)
    rates = {"in": 0, "out": 0}
    # one pool for all splits; workers die with the packer (no orphans after a SIGKILL)
    pool = mp.get_context("spawn").Pool(workers, initializer=_die_with_parent) if workers > 1 and todo > 1 else None
    try:
        with tqdm(total=todo, unit="img", desc=f"packing {out}", disable=not progress or todo == 0,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            for split in splits:
                records[split] = _pack_split(tree, out, split, plans[split], shorter_side, quality, pool,
                                             limit, bar, rates)
        counts = _write_outputs(out, tree, splits, records, pre_rejects)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"{out}: disk full; free space and re-run the same command "
                                        "(it resumes from the last complete shard)") from None
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    state["complete"] = True
    atomic_write_bytes(state_path, json.dumps(state, indent=1).encode())
    return PackSummary(*counts, wall_s=time.perf_counter() - t0)
