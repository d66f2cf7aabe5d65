"""`python -m bench.pack`: the packer's rate against the PIL bound, and where its time goes.

Bound = plain PIL on the same files: open, decode, convert to RGB, BILINEAR resize to the
packer's target size, JPEG q90 encode, in `cores` processes on disjoint parts that wait at a
barrier after importing and then run at once: all the images over the time from the first
start to the last end (start-up excluded, the cores shared as the packer shares them).
Packer = `shards.pack.build --workers cores` in a fresh process; its steady rate is the
inputs after the first quarter over the time they took (start-up, listing and set files
left out), taken from when it moves its progress bar (it does once per input, shown or not,
so any checkout can be measured: `--compare`). Both read from the page cache (the corpus is
read once first), so this measures CPU work, not disk. Each round runs bound, each packer,
bound; ratios are per round, and the median over rounds is reported, so drift from other
load on a shared machine hits both sides. CPU per image (packer process and workers) has a
run on HEAD_IMAGES images subtracted, which leaves out the start-up (imports).

The profile splits one image's cost into the stages of `shards.encode` (read, decode,
resize, encode, stats), building its tar members (`shards.writer.sample_blob`) and pickling
the result (what moves between processes), all in one process; and from a packer run, the
seconds per image the packer process spent writing (the single writer: tar, index, parts),
receiving results, and waiting for them, and how long the workers waited for work.

Corpora (generated, deterministic, cached under --work):
  photo  photo-like 500x375 JPEGs (`bench.corpus.synth_image`: 1/f texture over several
         octaves, colour, hard edges; q90, ~109 KB each, the commonest ImageNet shape and
         size), packed at shorter side 256
  demo   the demo tree's images (sides 300-600), packed at shorter side 128 as `make shards`

`measure_pack` (a packer run in a fresh process: wall, steady rate, CPU and peak RSS of the
packer and of its largest worker) is also what the reliability tests measure memory with.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from bench.corpus import CorpusSpec, write_tree
from shards.demo import write_demo
from shards.encode import encode, target_size
from shards.writer import sample_blob

IMAGENET_TRAIN = 1_281_167
CORPORA = {"photo": 256, "demo": 128}  # name: shorter side packed at
PHOTO_SIZE = (500, 375)
HEAD_IMAGES = 16  # the start-up run's images
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ corpora
def corpus(work: Path, name: str, images: int) -> Path:
    root = work / f"{name}-{images}"
    if not (root / "LOC_synset_mapping.txt").is_file():
        shutil.rmtree(root, ignore_errors=True)
        if name == "photo":
            write_tree(CorpusSpec(images=images, classes=10), root, size=PHOTO_SIZE)
        else:
            write_demo(root, classes=10, train_per_class=max(1, images // 10), val_per_class=0, seed=1,
                       min_side=300, max_side=600)
    return root


def head(src: Path, images: int) -> Path:
    """A tree of hard links to the first `images` images of `src` (same files, no copy): the
    packer's start-up cost, measured to subtract it."""
    dst = src.with_name(f"{src.name}-head{images}")
    if not (dst / "LOC_synset_mapping.txt").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        for f in sorted((src / "train").rglob("*.JPEG"))[:images]:
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst / f.relative_to(src))
        shutil.copy(src / "LOC_synset_mapping.txt", dst / "LOC_synset_mapping.txt")
    return dst


# ------------------------------------------------------------------ the bound
def bound_loop(files: list[str], shorter_side: int) -> None:
    """Plain PIL on each file: decode, RGB, BILINEAR resize to the packer's size, q90 encode."""
    for path in files:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            size = target_size(*rgb.size, shorter_side)
            if size != rgb.size:
                rgb = rgb.resize(size, Image.BILINEAR)
            rgb.save(io.BytesIO(), "JPEG", quality=90)


def _bound_part(job: tuple[list[str], int, object]) -> tuple[float, float, float]:
    files, shorter_side, barrier = job
    bound_loop(files[:4], shorter_side)  # warm the code paths
    barrier.wait()  # every process starts together: the cores are shared as in the packer
    t0, c0 = time.perf_counter(), time.process_time()
    bound_loop(files, shorter_side)
    return t0, time.perf_counter(), time.process_time() - c0


def parallel_bound(files: list[Path], shorter_side: int, cores: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the plain loop in `cores` processes at once on
    disjoint parts: all the images over the time from the first start to the last end
    (start-up excluded: the processes wait at a barrier after importing)."""
    manager = mp.get_context("spawn").Manager()
    barrier = manager.Barrier(cores)
    parts = [([str(f) for f in files[i::cores]], shorter_side, barrier) for i in range(cores)]
    try:
        with mp.get_context("spawn").Pool(cores) as pool:
            done = pool.map(_bound_part, parts, chunksize=1)
    finally:
        manager.shutdown()
    span = max(end for _, end, _ in done) - min(start for start, _, _ in done)
    return len(files) / span, sum(cpu for _, _, cpu in done) / len(files)


# ------------------------------------------------------------------ a packer run, measured
_RUN = """
import inspect, json, resource, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args.pop("root"))
import tqdm.std
from shards.pack import build
ticks = []  # the packer moves its progress bar once per input (disabled or not): when each was done
update = tqdm.std.tqdm.update
def tick(self, n=1):
    ticks.append(time.perf_counter())
    return update(self, n)
tqdm.std.tqdm.update = tick
profile = {}
extra = {"profile": profile} if "profile" in inspect.signature(build).parameters else {}
t0 = time.perf_counter()
s = build(args.pop("source"), args.pop("out"), progress=False, **args, **extra)
wall = time.perf_counter() - t0
q = len(ticks) // 4
steady = (len(ticks) - 1 - q) / (ticks[-1] - ticks[q]) if len(ticks) > 8 else float("nan")
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
# this process's own peak: VmHWM (ru_maxrss can carry the parent's size over a fork + exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "steady_img_s": steady, "packed": s.packed, "rejected": s.rejected,
                  "shards": s.shards, "bytes": s.bytes, "main_cpu_s": me.ru_utime + me.ru_stime,
                  "workers_cpu_s": kids.ru_utime + kids.ru_stime, "main_rss_mb": hwm / 1024,
                  "worker_rss_mb": kids.ru_maxrss / 1024, "profile": profile}))
"""


def measure_pack(source: Path, out: Path, packer_root: Path | None = None, **settings) -> dict:
    """Run `build(source, out, **settings)` in a fresh process (the shards package of
    `packer_root`, default this one); returns its wall time (inside `build`), its steady rate
    (inputs after the first quarter over the time they took), CPU seconds and peak RSS (MB)
    of the packer process and of its largest worker, and its profile."""
    shutil.rmtree(out, ignore_errors=True)
    root = str(packer_root or ROOT)
    args = json.dumps({"source": str(source), "out": str(out), "root": root, **settings})
    res = subprocess.run([sys.executable, "-c", _RUN, args], cwd=root, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"packer run failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ where one image's time goes
def stage_profile(files: list[Path], shorter_side: int) -> dict:
    """Milliseconds per image of each stage, in this one process."""
    clock: dict[str, float] = {}
    encoded = [encode(str(f), f.stem, shorter_side, 90, want_stats=True, clock=clock) for f in files]
    encoded = [e for e in encoded if not isinstance(e, str)]
    t0 = time.perf_counter()
    results = [(sample_blob(f"key{i}", e.jpeg, 3), e.width, e.height, e.count, e.sum, e.outer)
               for i, e in enumerate(encoded)]
    clock["tar_members"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in results:
        pickle.loads(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))
    clock["pickle"] = time.perf_counter() - t0
    return {k: round(v / len(files) * 1e3, 3) for k, v in clock.items()}


def _round(files: int, run: dict, start: dict, bound: float, bound_cpu: float) -> dict:
    """One packer run against the bound of its round; `start` is a run on HEAD_IMAGES images,
    whose CPU (start-up, mostly imports) is subtracted from the CPU per image."""
    n = files - HEAD_IMAGES
    main = (run["main_cpu_s"] - start["main_cpu_s"]) / n
    workers = (run["workers_cpu_s"] - start["workers_cpu_s"]) / n
    return {"packer_img_s": files / run["wall_s"], "steady_img_s": run["steady_img_s"],
            "fixed_s": run["wall_s"] - files / run["steady_img_s"], "ratio_steady": run["steady_img_s"] / bound,
            "ratio_e2e": files / run["wall_s"] / bound, "main_cpu_ms": main * 1e3, "workers_cpu_ms": workers * 1e3,
            "ratio_cpu": bound_cpu / (main + workers), "bound_cpu_ms": bound_cpu * 1e3,
            # the workers' own count of CPU from their first job on (packers that report it)
            "workers_busy_cpu_ms": run["profile"].get("workers_cpu_s", float("nan")) / files * 1e3,
            "main_rss_mb": run["main_rss_mb"],
            "worker_rss_mb": run["worker_rss_mb"]}


def run(work: Path, images: int, cores: int, rounds: int, corpora: list[str], packers: dict[str, Path]) -> dict:
    """`packers`: name -> root of a checkout whose shards package to measure (all in every round)."""
    results = {"cores": cores, "cpu_count": os.cpu_count(), "rounds": rounds,
               "packers": {k: str(v) for k, v in packers.items()}, "corpora": {}}
    for name in corpora:
        shorter_side = CORPORA[name]
        src = corpus(work, name, images)
        files = sorted((src / "train").rglob("*.JPEG"))
        in_mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:  # the page cache holds the corpus for every run below
            f.read_bytes()
        start_tree = head(src, HEAD_IMAGES)
        settings = dict(splits=["train"], shorter_side=shorter_side, workers=cores, shard_size_mb=16)
        rows: dict[str, list[dict]] = {k: [] for k in packers}
        bounds, profiles = [], {}
        for _ in range(rounds):
            b1, c1 = parallel_bound(files, shorter_side, cores)
            runs = {key: (measure_pack(src, work / f"{name}-out", root, **settings),
                          measure_pack(start_tree, work / f"{name}-out", root, **settings))
                    for key, root in packers.items()}
            b2, c2 = parallel_bound(files, shorter_side, cores)
            bound, bound_cpu = (b1 + b2) / 2, (c1 + c2) / 2
            bounds.append({"bound_img_s": bound, "bound_cpu_ms": bound_cpu * 1e3})
            for key, (r, start) in runs.items():
                rows[key].append(_round(len(files), r, start, bound, bound_cpu))
                profiles.setdefault(key, r["profile"])
        med_bound = {k: round(statistics.median(b[k] for b in bounds), 3) for k in bounds[0]}
        entry = {"images": len(files), "shorter_side": shorter_side, "input_mb": round(in_mb, 1),
                 "bound": med_bound, "bound_rounds": [{k: round(v, 3) for k, v in b.items()} for b in bounds],
                 "stages_ms_per_image": stage_profile(files[: min(len(files), 200)], shorter_side), "packers": {}}
        for key, rs in rows.items():
            med = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
            entry["packers"][key] = {
                "median": med, "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rs],
                "profile_ms_per_image": {k: round(v / len(files) * 1e3, 3) for k, v in profiles[key].items()
                                         if k.endswith("_s") and k not in ("wall_s", "discover_s")},
                "projected_imagenet_train_h": {
                    str(c): round(IMAGENET_TRAIN / (med_bound["bound_img_s"] / cores * c
                                                    * min(1.0, med["ratio_steady"])) / 3600, 2) for c in (2, 32)},
            }
        results["corpora"][name] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pack", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-shards"), help="corpora and outputs")
    p.add_argument("--images", type=int, default=800, help="images per corpus")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="packer workers (bound x this)")
    p.add_argument("--rounds", type=int, default=3, help="bound/packer rounds (the median is reported)")
    p.add_argument("--corpora", default="photo", help=f"comma-separated, of: {','.join(CORPORA)}")
    p.add_argument("--compare", type=Path, default=None,
                   help="also measure the shards package of another checkout (e.g. an older commit) in each round")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    packers = {"this": ROOT, **({"compare": args.compare.resolve()} if args.compare else {})}
    results = run(args.work, args.images, args.cores, args.rounds, args.corpora.split(","), packers)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
