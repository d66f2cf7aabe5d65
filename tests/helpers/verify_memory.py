"""`python -m shards verify`'s memory against the manifest's size (issue 23, findings 6 and 8),
on a set that verifies clean, built in seconds:

- one tar of `per_tar` samples, each an 8x8 baseline RGB JPEG (so the decode check is cheap)
  and its label, written with the packer's own member writer, and its index;
- every train tar of the set a hard link to it, every index a hard link to its index: keys
  repeat across tars, which verify allows (it checks keys per shard, as the manifest files
  them), so every check passes;
- `manifest.parquet` with the tar's rows once per tar (the packer's columns, a shard's rows
  together in a row group of their own, as the packer writes them) and `shards.parquet` with each tar's size, count and
  sha256.

Unlike `helpers.scale_sets` (whose tiled manifest does not match its tars: verify would name a
problem per row, and the problems list would be what grows), every manifest row here is found
in its shard, so what verify holds per row is its own streaming.

    python tests/helpers/verify_memory.py DIR SAMPLES [PER_TAR] [WORKERS]

Prints one JSON line: `rows` (manifest rows), `tars`, `samples` and `problems` (verify's
report), `py_peak` (tracemalloc's peak in the verifying process), `arrow_peak` (its Arrow
pool's peak), `hwm` (its VmHWM, bytes), `children_maxrss` (the largest worker's peak RSS,
bytes) and `seconds`. The set is written by a first process (or kept, if DIR exists), verify
measured in a second, so the peaks hold verify alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

PER_TAR = 5000  # ImageNet's train tars hold ~4,890 samples at 256 MB
CLASSES = 1000


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(out: Path, samples: int, per_tar: int = PER_TAR) -> Path:
    """A train split of `samples` rows rounded up to whole tars of `per_tar` samples."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.index import write_index
    from shards.writer import sample_blob

    ntars = -(-samples // per_tar)
    out.mkdir(parents=True)
    (out / "train").mkdir()
    base = out / ".base.tar"
    images = [_jpeg(i) for i in range(16)]
    keys, labels, nbytes = [], [], []
    with open(base, "wb") as f:
        for i in range(per_tar):
            label, image = i % CLASSES, images[i % len(images)]
            key = f"n{label:08d}_{i}"
            f.write(sample_blob(key, image, label)[0])
            keys.append(key)
            labels.append(label)
            nbytes.append(len(image))
        f.write(b"\0" * 1024)  # the tar's end-of-archive blocks
    write_index(base, base.with_suffix(".idx"))
    size, sha = base.stat().st_size, hashlib.sha256(base.read_bytes()).hexdigest()
    names = [f"shard-{i:06d}.tar" for i in range(ntars)]
    for name in names:
        os.link(base, out / "train" / name)
        os.link(base.with_suffix(".idx"), out / "train" / name.replace(".tar", ".idx"))
    base.unlink()
    base.with_suffix(".idx").unlink()

    wnids = [f"n{label:08d}" for label in labels]
    one = pa.table({"key": pa.array(keys), "label": pa.array(labels, pa.int64()), "wnid": pa.array(wnids),
                    "width": pa.array([8] * per_tar, pa.int32()), "height": pa.array([8] * per_tar, pa.int32()),
                    "nbytes": pa.array(nbytes, pa.int64()),
                    "source": pa.array([f"train/{w}/{k}.JPEG" for w, k in zip(wnids, keys, strict=True)])})
    take = pa.array(np.tile(np.arange(per_tar), ntars))
    rows = one.take(take)
    manifest = pa.table({"key": rows["key"], "split": pa.array(["train"] * len(rows)),
                         "shard": pa.array(np.repeat(np.array(names, dtype=object), per_tar), pa.string()),
                         "label": rows["label"], "wnid": rows["wnid"], "width": rows["width"],
                         "height": rows["height"], "nbytes": rows["nbytes"], "source": rows["source"]})
    pq.write_table(manifest, out / "manifest.parquet", row_group_size=per_tar)  # the packer: a row group per shard
    pq.write_table(pa.table({"split": ["train"] * ntars, "shard": names, "bytes": [size] * ntars,
                             "samples": [per_tar] * ntars, "sha256": [sha] * ntars}), out / "shards.parquet")
    return out


def _status(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(root: Path, workers: int | None) -> dict:
    import resource

    import pyarrow as pa

    from shards.verify import verify

    tracemalloc.start()
    t0 = time.perf_counter()
    report = verify(root, workers=workers)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(root / "manifest.parquet").metadata
    return {"rows": meta.num_rows, "tars": report.shards, "samples": report.samples,
            "problems": len(report.problems), "first_problem": report.problems[:1], "py_peak": peak,
            "arrow_peak": pa.default_memory_pool().max_memory(), "hwm": _status("VmHWM"),
            "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "seconds": round(seconds, 2)}


def main() -> None:
    root, samples = Path(sys.argv[1]), int(sys.argv[2])
    per_tar = int(sys.argv[3]) if len(sys.argv) > 3 else PER_TAR
    workers = sys.argv[4] if len(sys.argv) > 4 else "0"
    if sys.argv[5:] == ["--measure"]:
        print(json.dumps(measure(root, int(workers) or None)))
        return
    if not root.exists():
        build(root, samples, per_tar)
    out = subprocess.run([sys.executable, __file__, str(root), str(samples), str(per_tar), workers, "--measure"],
                         check=True, capture_output=True, text=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
