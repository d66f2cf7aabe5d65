"""Side-by-side images/s of the DALI CPU loader and the torch baseline on the same shards.

    python -m bench.loader.measure --shards data/shards [--batch-size 64] [--batches 20] [--repeats 3]

Each case reads `--batches` batches after one warm-up batch; the cases take turns within
each repeat, so drift on a shared machine hits them all alike, and the ratios are
reported against the torch baseline measured in the same run. (`make bench`,
`python -m bench.loader`, is the full benchmark; this is the quick check of issue 5.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from pipeline import make_loader

# (name, backend, split, extra arguments)
CASES = (
    ("dali train rrc", "dali", "train", {"crop": "rrc"}),
    ("dali train paper", "dali", "train", {"crop": "paper"}),
    ("dali val", "dali", "val", {}),
    ("torch train rrc", "torch", "train", {"crop": "rrc"}),
    ("torch train paper", "torch", "train", {"crop": "paper"}),
    ("torch val", "torch", "val", {}),
)


def images_per_s(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: pipeline build, worker start, first decode
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    elapsed = time.perf_counter() - start
    it.close()
    return n / elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loader.measure", description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard set (SHARDS_DIR) holding train/ and val/")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per case and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads and DataLoader workers (default: the usable cores)")
    args = p.parse_args(argv)
    try:
        loaders = {
            name: make_loader(args.shards, split, batch_size=args.batch_size, device="cpu",
                              backend=backend, crop_size=args.crop_size, num_threads=args.threads, **extra)
            for name, backend, split, extra in CASES
        }
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for name, loader in loaders.items():
        if len(loader) < args.batches + 1:
            raise SystemExit(f"error: {name}: {len(loader)} batches per epoch, need --batches + 1; "
                             "lower --batches or --batch-size")
    runs: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(args.repeats):
        for name, loader in loaders.items():
            runs[name].append(images_per_s(loader, args.batches))
            print(f"repeat {r + 1}/{args.repeats}  {name:<18} {runs[name][-1]:8.1f} images/s", flush=True)
    print(f"\n{args.shards}: batch {args.batch_size}, crop {args.crop_size}, {args.threads} threads/workers, "
          f"median of {args.repeats} x {args.batches} batches")
    print(f"{'case':<18} {'images/s':>9} {'min':>8} {'max':>8} {'vs torch':>9}")
    for name, values in runs.items():
        kind = name.split(" ", 1)[1]
        base = statistics.median(runs[f"torch {kind}"])
        med = statistics.median(values)
        print(f"{name:<18} {med:9.1f} {min(values):8.1f} {max(values):8.1f} {med / base:8.2f}x")


if __name__ == "__main__":
    main()
