"""The audit's memory against the ledger's size (issue 23): a metadata-only manifest of N train
keys and a sample ledger of E epochs of them (64 ranks x 256 per step, a fresh order each
epoch), then `orchestration.audit.audit` on it in a fresh process.

    python tests/helpers/audit_memory.py DIR N EPOCHS

Prints one JSON line: `rows` (ledger rows), `epochs`, `py_peak` (tracemalloc's peak),
`arrow_peak` (Arrow's pool, peak: the scan's batches and the per-epoch key counts),
`ledger_bytes` (the ledger's Parquet files on disk) and `seconds`. The files are written by a
first process, the audit measured in a second, so the peaks hold the audit alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

WORLD, BATCH = 64, 256


def write(root: Path, n: int, epochs: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestration.ledger import LEDGER_DIR

    keys = pa.array([f"n{i // 1300:08d}_{i}" for i in range(n)], pa.string())
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"split": pa.array(["train"] * n), "key": keys}), root / "shards" / "manifest.parquet")
    ledger = root / "run" / LEDGER_DIR
    ledger.mkdir(parents=True)
    per_epoch = (n // (WORLD * BATCH)) * WORLD * BATCH  # full steps only, as the loader yields
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(n)[:per_epoch]
        i = np.arange(per_epoch)
        pq.write_table(pa.table({"epoch": pa.array(np.full(per_epoch, epoch), pa.int64()),
                                 "step": pa.array(i // (WORLD * BATCH), pa.int64()),
                                 "rank": pa.array((i // BATCH) % WORLD, pa.int64()),
                                 "key": keys.take(pa.array(order))}),
                       ledger / f"a0000-r00000-s{epoch:09d}-{epoch:09d}.parquet")


def measure(root: Path) -> dict:
    import pyarrow as pa

    from orchestration.audit import audit

    tracemalloc.start()
    t0 = time.perf_counter()
    results = audit(str(root / "run"), shards=str(root / "shards"), out=lambda line: None)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    ledger = sum(f.stat().st_size for f in (root / "run").rglob("*.parquet"))
    return {"rows": sum(r.trained for r in results), "epochs": len(results), "py_peak": peak,
            "arrow_peak": pa.default_memory_pool().max_memory(), "ledger_bytes": ledger,
            "seconds": round(seconds, 2), "faults": sum(bool(r.faults) for r in results)}


def main() -> None:
    root, n, epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if sys.argv[4:] == ["--measure"]:
        print(json.dumps(measure(root)))
        return
    if not root.exists():
        write(root, n, epochs)
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:4], "--measure"], check=True,
                         capture_output=True, text=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
