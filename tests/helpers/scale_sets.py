"""Metadata-only shard sets at ImageNet size, built in seconds from one small packed tar
(issue 23): every tar of the set is a hard link to that tar, every index a hard link to one
index whose lines cycle the tar's own lines (so every offset lies inside the tar), and the
manifest and shards.parquet are tiled to the stated sizes. Loaders open, split and check such
a set as they would ImageNet; its images repeat."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build(src: Path, out: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """`sizes`: split -> (samples, tars). `src`: a packed set (its first train tar is used)."""
    tar = sorted((src / "train").glob("*.tar"))[0]
    lines = tar.with_suffix(".idx").read_text().splitlines()[1:]
    manifest = pq.read_table(src / "manifest.parquet")
    sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    out.mkdir(parents=True)
    for name in ("stats.json", "classes.json"):
        shutil.copy(src / name, out / name)
    rows, tables = [], []
    for split, (samples, ntars) in sizes.items():
        (out / split).mkdir()
        counts = [samples * (i + 1) // ntars - samples * i // ntars for i in range(ntars)]
        idx_files: dict[int, Path] = {}
        for i, count in enumerate(counts):
            name = f"shard-{i:06d}"
            os.link(tar, out / split / f"{name}.tar")
            if count not in idx_files:
                body = [lines[j % len(lines)] for j in range(count)]
                idx_files[count] = out / f".idx-{count}"
                idx_files[count].write_text(f"v1.2 {count}\n" + "\n".join(body) + "\n")
            os.link(idx_files[count], out / split / f"{name}.idx")
            rows.append({"split": split, "shard": f"{name}.tar", "bytes": tar.stat().st_size, "samples": count,
                         "sha256": sha})
        take = np.arange(samples) % manifest.num_rows
        part = manifest.take(pa.array(take))
        tables.append(part.set_column(part.schema.get_field_index("split"), "split",
                                      pa.array([split] * samples, pa.string())))
    for f in out.glob(".idx-*"):
        f.unlink()  # the links in the split folders keep the data
    pq.write_table(pa.Table.from_pylist(rows), out / "shards.parquet")
    pq.write_table(pa.concat_tables(tables), out / "manifest.parquet")
    return out


def open_figures(path: str, split: str, rank: int, world_size: int) -> str:
    """What one rank's make_loader reads and parses on the set at `path`, in one line."""
    import resource
    import time

    import shards.index as index
    from pipeline import make_loader

    def read_chars() -> int:
        line = next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar"))
        return int(line.split()[1])

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    lines, chars, cpu, wall = index.LINES_PARSED[0], read_chars(), cpu_s(), time.perf_counter()
    loader = make_loader(path, split, batch_size=256, rank=rank, world_size=world_size, device="cpu",
                         num_threads=1, crop_size=56)
    wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
    return (f"{split}: make_loader rank {rank}/{world_size}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
            f"{index.LINES_PARSED[0] - lines} index lines parsed of {loader.dataset_size}, "
            f"{(read_chars() - chars) / 1e6:.1f} MB read, {loader.num_samples} samples, "
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":  # python tests/helpers/scale_sets.py SRC OUT TRAIN/TARS VAL/TARS [RANK/WORLD]
    import sys

    src, out, train, val = sys.argv[1:5]
    target = Path(out)
    if not target.exists():
        build(Path(src), target, {s: tuple(map(int, v.split("/"))) for s, v in (("train", train), ("val", val))})
    rank, world = map(int, (sys.argv[5] if len(sys.argv) > 5 else "0/64").split("/"))
    for split in ("train", "val"):
        print(open_figures(out, split, rank, world))
