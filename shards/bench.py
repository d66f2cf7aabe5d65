"""`python -m shards.bench`: the packer's rate against the PIL bound, measured in one run.

Bound = PIL decode (draft) + RGB + resize + JPEG encode of the same files (the packer's own
`encode`, without tar, index, stats or IPC), run as a plain loop in `cores` processes on
disjoint parts, each timed inside itself: per core x cores, under the same machine load.
The packer runs with `--workers` = those cores and is timed end to end (start-up included).
Both read from the page cache (each corpus is read once before timing), so this measures
CPU work, not disk. Timings alternate bound, packer, bound and use the mean of the bounds,
so drift from other load on the machine hits both.

Corpora (generated, deterministic, cached under --work):
  demo      the demo tree's images (sides 300-600), packed at shorter side 128 as `make shards`
  imagenet  ImageNet-like photos-sized JPEGs (sides 375-500, q90, ~ImageNet's mean size),
            packed at shorter side 256 as `IMAGENET_DIR=... make shards`
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

from shards.demo import write_demo
from shards.encode import encode
from shards.pack import build

IMAGENET_TRAIN = 1_281_167
CORPORA = {  # name: (min_side, max_side, shorter_side)
    "demo": (300, 600, 128),
    "imagenet": (375, 500, 256),
}


def corpus(work: Path, name: str, images: int) -> Path:
    lo, hi, _ = CORPORA[name]
    root = work / f"{name}-{images}"
    if not (root / "LOC_synset_mapping.txt").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_demo(root, classes=10, train_per_class=max(1, images // 10), val_per_class=0, seed=1,
                   min_side=lo, max_side=hi)
    return root


def bound_rate(files: list[Path], shorter_side: int) -> float:
    """Images/s of PIL decode + resize + encode in this one process (the packer's own op)."""
    t0 = time.perf_counter()
    for p in files:
        encode(str(p), p.stem, shorter_side, 90, want_stats=False)
    return len(files) / (time.perf_counter() - t0)


def _bound_part(job: tuple[list[str], int]) -> float:
    files, shorter_side = job
    return bound_rate([Path(f) for f in files], shorter_side)


def parallel_bound(files: list[Path], shorter_side: int, cores: int) -> float:
    """Sum over `cores` processes of the plain loop's rate on disjoint parts (timed inside each,
    so process start-up is excluded): per core x cores, under the same machine load."""
    parts = [([str(f) for f in files[i::cores]], shorter_side) for i in range(cores)]
    with mp.get_context("spawn").Pool(cores) as pool:
        return sum(pool.map(_bound_part, parts, chunksize=1))


def run(work: Path, images: int, cores: int) -> dict:
    results = {"cores": cores, "cpu_count": os.cpu_count(), "corpora": {}}
    for name, (_, _, shorter_side) in CORPORA.items():
        src = corpus(work, name, images)
        files = sorted((src / "train").rglob("*.JPEG"))
        in_mb = sum(p.stat().st_size for p in files) / 1e6  # also warms the page cache
        for p in files:
            p.read_bytes()
        b1 = parallel_bound(files, shorter_side, cores)
        out = work / f"{name}-shards"
        shutil.rmtree(out, ignore_errors=True)
        summary = build(src, out, splits=("train",), shorter_side=shorter_side, workers=cores,
                        shard_size_mb=16, progress=False)
        b2 = parallel_bound(files, shorter_side, cores)
        per_core = (b1 + b2) / 2 / cores
        rate = summary.packed / summary.wall_s
        results["corpora"][name] = {
            "images": len(files), "shorter_side": shorter_side, "input_mb": round(in_mb, 1),
            "bound_per_core_img_s": round(per_core, 1), "bound_img_s": round(per_core * cores, 1),
            "packer_img_s": round(rate, 1), "packer_in_mb_s": round(in_mb / summary.wall_s, 1),
            "packer_out_mb_s": round(summary.bytes / 1e6 / summary.wall_s, 1),
            "packer_vs_bound": round(rate / (per_core * cores), 3),
            "projected_imagenet_train_h": {
                str(c): round(IMAGENET_TRAIN / (per_core * c * min(1.0, rate / (per_core * cores))) / 3600, 2)
                for c in (2, 32)
            },
        }
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.bench", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-shards"), help="corpora and outputs")
    p.add_argument("--images", type=int, default=400, help="images per corpus")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="packer workers (bound x this)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = run(args.work, args.images, args.cores)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
