"""`make bench`: input-pipeline throughput against the torch baseline and the decode bound.

    python -m bench.loader                 # cached ImageNet-like corpus (256 and full size)
    python -m bench.loader --shards DIR    # the user's own shards (a path or an s3:// URI)
    python -m bench.loader --quick         # about a minute: the same JSON, fewer rounds
    python -m bench.loader --shards DIR --s3   # add the object-storage part on those shards
    python -m bench.loader --peers         # add the peers side by side (SPDL, LitData, pillow-simd; bench.peers)

All figures of one shard set are measured in the same rounds, interleaved (see
`bench.timing`): the decode bound (PIL and DALI's CPU decoder alone, per core;
DALI `mixed` on a GPU), the torch baseline and DALI CPU for every graph, the train crops
`rrc` (the default) and `paper` and the val graph, at all cores (DALI GPU too when there is
one), with sweeps (torch `rrc` at 0..cores DataLoader workers, DALI's train crops at 1
thread), and the DALI CPU graph cut after each stage (the profile, `bench.loader.profile`), and (default corpus,
or `--s3`) the same shards staged from and streamed from a local S3 server
(`bench.loader.staging`). Every ratio compares one graph with the same graph, both sides
at all cores (workers = threads = cores); the headline ratios are `rrc`'s, with `_paper` and
`_val` twins. Then what starting a pass costs the train loader (`rebuild`: passes back to
back, first batch against the whole pass, resident memory), and the end-to-end figure: the
data-wait share of AlexNet training steps with each loader. Writes `runs/bench/latest.json`,
a timestamped copy, `bench.png` and `latest.md` (the table in Markdown).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np

from bench.corpus import CorpusSpec, ensure_corpus
from bench.decode import dali_decode_source, load_jpegs, pil_rate, pil_source
from bench.figures import POLICIES, figure, policy, ratio
from bench.loader.profile import PROFILE_STAGES, build_stage
from bench.loader.report import markdown, plot, table, write_json
from bench.loader.staging import StagingBench, stage_remote_set
from bench.timing import Source, loader_source, measure_interleaved, pipeline_source, time_passes
from bench.views import shard_view
from shards.location import is_remote

SCHEMA = 2  # 2: ratios per policy (rrc, paper, val) at all cores, pairs, rebuild
IMAGENET_TRAIN = 1_281_167  # images in an ILSVRC-2012 train epoch
TARGETS = {"dali_cpu_over_torch": 1.5, "dali_cpu_over_decode_bound": 0.85}


@dataclass(frozen=True)
class Settings:
    """How long and how wide the bench measures."""

    batch_size: int = 64
    crop_size: int = 224
    warmup: int = 2  # untimed batches each time a source's turn comes (torch: plus one per worker)
    window: int = 8  # timed batches per round
    repeats: int = 3  # rounds: the figure is their median, the spread their range
    settle_s: float = 0.1
    decode_images: int = 640  # encoded images held in memory for the decode bound
    torch_workers: tuple[int, ...] = ()  # empty: 0..cores
    dali_threads: tuple[int, ...] = ()  # empty: 1 and cores
    profile: bool = True
    e2e_model: str = "alexnet-bn"
    e2e_crop: int = 128
    e2e_steps: int = 8
    e2e_warmup: int = 2
    rebuild_passes: int = 10  # passes of the train loader back to back, for what starting a pass costs
    rebuild_images: int = 1280  # ... over the first train tars holding this many samples


# --quick: the same measurements, fewer and shorter (no sweeps: torch rrc at 0 workers, the rest at all cores)
QUICK = Settings(batch_size=16, warmup=1, window=2, repeats=2, settle_s=0.0, decode_images=64,
                 e2e_crop=64, e2e_steps=2, e2e_warmup=1)


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def count(n: int, word: str) -> str:
    """"1 thread", "2 threads", "0 workers", "2 processes"."""
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown") \
        if Path("/proc/cpuinfo").is_file() else platform.processor() or "unknown"
    mem = None
    if Path("/proc/meminfo").is_file():
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = round(kb / 2**20, 1)
    return {"cores": len(os.sched_getaffinity(0)), "cpu_model": cpu, "memory_gib": mem,
            "gpu": gpu_name(), "platform": platform.platform()}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def versions() -> dict:
    from PIL import features

    out = {"python": platform.python_version(), "libjpeg_turbo": features.version("jpg")}
    for dist in ("torch", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "webdataset", "pillow", "numpy", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def loader_configs(settings: Settings, cores: int, gpu: bool, reduced: bool = False) -> list[tuple[str, dict]]:
    """(name, make_loader keyword arguments with `split`) for every loader the bench times.
    Every policy (rrc, paper, val) is timed with both backends at all cores, so each ratio
    compares the same graph; the sweeps (torch at 0..cores workers for rrc, DALI at 1 and
    cores threads for each crop) show how each scales. `reduced` (the second shard set)
    keeps the all-cores cases only."""
    workers = (cores,) if reduced else settings.torch_workers or tuple(range(cores + 1))
    threads = (cores,) if reduced else settings.dali_threads or tuple(sorted({1, cores}))
    train = {crop: dict(split="train", crop=crop) for crop in ("rrc", "paper")}
    graphs = {**train, "val": dict(split="val")}
    out = [(f"torch rrc {count(w, 'worker')}", dict(backend="torch", device="cpu", **train["rrc"], num_threads=w))
           for w in workers]
    out += [(f"torch {p} {count(cores, 'worker')}", dict(backend="torch", device="cpu", **graphs[p], num_threads=cores))
            for p in ("paper", "val")]
    out += [(f"dali cpu {crop} {count(t, 'thread')}", dict(backend="dali", device="cpu", **train[crop], num_threads=t))
            for crop in ("rrc", "paper") for t in threads]
    out.append((f"dali cpu val {count(cores, 'thread')}", dict(backend="dali", device="cpu", **graphs["val"],
                                                               num_threads=cores)))
    if gpu:
        out += [(f"dali gpu {p} {count(cores, 'thread')}",
                 dict(backend="dali", device="cuda", **graphs[p], num_threads=cores)) for p in POLICIES]
    return out


def build_sources(shards_dir: Path, settings: Settings, cores: int, gpu: bool, reduced: bool,
                  staging: StagingBench | None = None, val_dir: Path | None = None) -> list[Source]:
    """Every source of one shard set: decoders alone, loaders, and the profile's cut graphs;
    the val loaders read `val_dir` (default: the set itself)."""
    from pipeline import make_loader

    val_dir = val_dir or shards_dir
    blobs = load_jpegs(shards_dir, limit=settings.decode_images)
    b = settings.batch_size
    sources = [pil_source("decode pil 1 thread", blobs, b)]
    sources += [dali_decode_source(f"decode dali cpu {count(t, 'thread')}", blobs, "cpu", t, b)
                for t in sorted({1, cores})]
    if gpu:
        sources.append(dali_decode_source("decode dali mixed", blobs, "mixed", cores, b))
    for s in sources:
        s.meta["kind"] = "decode"
    for name, kwargs in loader_configs(settings, cores, gpu, reduced):
        where = val_dir if kwargs["split"] == "val" else shards_dir
        loader = make_loader(str(where), batch_size=b, rank=0, world_size=1, crop_size=settings.crop_size,
                             seed=0, **kwargs)
        # DataLoader workers each build whole batches and start together: their first burst is warm-up
        extra = kwargs["num_threads"] if kwargs["backend"] == "torch" else 0
        sources.append(loader_source(name, loader, extra, {"kind": "loader", "kwargs": kwargs}))
    if staging is not None:
        sources += staging.sources(b, settings.crop_size, cores)
    if settings.profile:
        for stage in PROFILE_STAGES:
            build = partial(build_stage, stage, shards_dir, b, cores, settings.crop_size)
            sources.append(pipeline_source(stage, build, b, {"kind": "profile"}))
    return sources


def bench_shards(label: str, shards_dir: Path, settings: Settings, cores: int, gpu: bool, reduced: bool,
                 progress, staging: StagingBench | None = None) -> dict:
    """Decode bound, loaders and profile of one shard set, all in the same interleaved rounds."""
    progress(f"[{label}] PIL decode alone in 1 and {cores} processes")
    measured = {f"decode pil {count(procs, 'process')}":
                {"images_per_s": pil_rate(shards_dir, settings.decode_images, procs, settings.repeats)}
                for procs in sorted({1, cores})}
    progress(f"[{label}] building sources on {shards_dir}")
    # the val graph reads the train tars (as split "val" of a view): the same bytes as the
    # decode bound and the train graphs, so its ratios compare like with like
    with tempfile.TemporaryDirectory(prefix="bench-val-view-") as tmp:
        val_dir = shard_view(shards_dir, Path(tmp) / "set", {"val": "train"})
        sources = build_sources(shards_dir, settings, cores, gpu, reduced, staging, val_dir)
        progress(f"[{label}] timing {len(sources)} sources: {settings.repeats} rounds x "
                 f"({settings.warmup} warm-up + {settings.window} timed batches of {settings.batch_size})")
        timed = measure_interleaved(sources, settings.warmup, settings.window, settings.repeats,
                                    settings.settle_s, progress)
        kinds = {s.name: s.meta for s in sources}
        del sources
    measured.update({n: {k: t[k] for k in ("images_per_s", "cpu_ms_per_image")}
                     for n, t in timed.items() if kinds[n]["kind"] == "decode"})
    # per core: what one PIL thread or one DALI thread decodes, timed in the interleaved rounds
    per_core = {n: measured[n] for n in ("decode pil 1 thread", "decode dali cpu 1 thread")}
    best_name = max(per_core, key=lambda n: per_core[n]["images_per_s"]["median"])
    cheapest = min(per_core, key=lambda n: per_core[n]["cpu_ms_per_image"]["median"])
    return {
        "decode_bound": {
            "measured": measured,
            "bound": round(per_core[best_name]["images_per_s"]["median"] * cores, 1),
            "bound_from": f"{best_name} x {cores} cores",
            "bound_per_core": per_core[best_name]["images_per_s"],
            "cpu_ms_per_image": per_core[cheapest]["cpu_ms_per_image"],
            "cpu_ms_from": cheapest,
        },
        "loaders": {n: {"kwargs": kinds[n]["kwargs"], **t} for n, t in timed.items() if kinds[n]["kind"] == "loader"},
        "profile": {n: {k: t[k] for k in ("images_per_s", "cpu_ms_per_image")}
                    for n, t in timed.items() if kinds[n]["kind"] == "profile"},
    }


BACKENDS = {("torch", "cpu"): "torch", ("dali", "cpu"): "dali_cpu", ("dali", "cuda"): "dali_gpu"}


def pairs(loaders: dict, cores: int) -> dict[str, dict[str, dict]]:
    """{policy: {"torch" | "dali_cpu" | "dali_gpu": figure with "name" and "cpu_ms_per_image"}}:
    the loaders on local shards at all cores (DataLoader workers = DALI threads = cores), the
    cases every ratio compares, policy against the same policy."""
    out: dict[str, dict[str, dict]] = {}
    for name, entry in loaders.items():
        kwargs = entry["kwargs"]
        if name.startswith("s3 ") or kwargs.get("num_threads") != cores:
            continue
        side = BACKENDS[(kwargs["backend"], kwargs["device"])]
        out.setdefault(policy(kwargs), {})[side] = {"name": name, **entry["images_per_s"],
                                                    "cpu_ms_per_image": entry["cpu_ms_per_image"]["median"]}
    return {p: out[p] for p in POLICIES if p in out}


def rebuild_cost(shards_dir: Path, settings: Settings, cores: int, progress) -> dict:
    """What starting a pass costs the train loader (DALI CPU, rrc, all cores): passes run back
    to back over the first tars of the set; for passes 2..N, the time from the start of a pass
    to its first batch against the whole pass, and the process's resident memory after each.
    `rebuild_s` is the first-batch time less one steady batch: what a pass pays before its
    first batch beyond making it (building the pipeline, parsing indexes, filling the shuffle
    buffer); `imagenet_epoch_share` puts it against a whole ImageNet epoch at the steady rate."""
    from pipeline import make_loader
    from shards.layouts import split_tars

    kwargs = dict(backend="dali", device="cpu", split="train", crop="rrc", num_threads=cores)
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
        view = shard_view(shards_dir, Path(tmp) / "set", {"train": "train"}, settings.rebuild_images)
        loader = make_loader(str(view), batch_size=settings.batch_size, rank=0, world_size=1,
                             crop_size=settings.crop_size, seed=0, **kwargs)
        tars, images = len(split_tars(view, "train")), loader.num_samples
        progress(f"rebuild: {settings.rebuild_passes} passes of dali cpu rrc {count(cores, 'thread')} over "
                 f"{tars} tars ({images} images, {len(loader)} batches of {settings.batch_size})")
        runs = time_passes(loader, settings.rebuild_passes)
        del loader
    later = runs[1:]
    if not later or min(r["batches"] for r in later) < 2:
        raise ValueError("rebuild: need at least 2 passes of at least 2 batches (lower --batch-size)")
    first = figure([r["first_batch_s"] for r in later], unit="s")
    whole = figure([r["pass_s"] for r in later], unit="s")
    batch = figure([(r["pass_s"] - r["first_batch_s"]) / (r["batches"] - 1) for r in later], unit="s")
    steady = figure([(r["images"] - r["images"] / r["batches"]) / (r["pass_s"] - r["first_batch_s"])
                     for r in later])
    rebuild_s = max(0.0, first["median"] - batch["median"])
    epoch_s = IMAGENET_TRAIN / steady["median"]
    rss = [r["rss_mib"] for r in runs]
    out = {
        "loader": f"dali cpu rrc {count(cores, 'thread')}", "kwargs": kwargs, "shards_dir": str(shards_dir),
        "tars": tars, "images_per_pass": images, "batches_per_pass": later[0]["batches"],
        "batch_size": settings.batch_size, "passes": len(runs),
        "pass_1": {k: round(runs[0][k], 4) for k in ("first_batch_s", "pass_s")},
        "first_batch_s": first, "pass_s": whole, "batch_s": batch, "steady_images_per_s": steady,
        "rebuild_s": round(rebuild_s, 4),
        "rebuild_share": round(rebuild_s / whole["median"], 4),
        "first_batch_share": round(first["median"] / whole["median"], 4),
        "imagenet_epoch_s": round(epoch_s, 1), "imagenet_epoch_share": round(rebuild_s / epoch_s, 7),
        "rss_mib": rss,
    }
    if len(rss) >= 2 and None not in rss:
        out.update(rss_after_pass_2_mib=rss[1], rss_after_last_mib=rss[-1], rss_growth_mib=round(rss[-1] - rss[1], 1))
        # RSS moves up and down as freed pipelines are collected: the trend over passes 2..N
        # says more than its two ends
        out["rss_slope_mib_per_pass"] = round(float(np.polyfit(range(len(rss) - 1), rss[1:], 1)[0]), 2) \
            if len(rss) >= 3 else None
    progress(f"rebuild: first batch {first['median']:.3f} s of a {whole['median']:.2f} s pass (steady batch "
             f"{batch['median']:.3f} s): {out['rebuild_share']:.1%} of this pass; RSS {rss[1]} -> {rss[-1]} MiB "
             f"from pass 2 to {len(rss)}")
    return out


def end_to_end(shards_dir: Path, chosen: list[tuple[str, dict]], settings: Settings, progress) -> dict:
    """Data-wait share while training AlexNet with each chosen loader (`bench.e2e`), in this process."""
    from bench.e2e import data_wait

    classes_file = Path(shards_dir) / "classes.json"
    num_classes = len(json.loads(classes_file.read_text())) if classes_file.is_file() else 1000
    loaders = {name: {**kwargs, "batch_size": settings.batch_size, "rank": 0, "world_size": 1,
                      "crop_size": settings.e2e_crop, "seed": 0} for name, kwargs in chosen}
    progress(f"end-to-end: {settings.e2e_model} at crop {settings.e2e_crop}, {settings.e2e_warmup} + "
             f"{settings.e2e_steps} steps of {settings.batch_size} with each of: {', '.join(loaders)}")
    out = {}
    for name, kwargs in loaders.items():
        entry = data_wait(str(shards_dir), kwargs, settings.e2e_model, num_classes, settings.e2e_steps,
                          settings.e2e_warmup, settings.repeats, "cuda" if kwargs["device"] == "cuda" else "cpu")
        out[name] = {**entry, "loader_kwargs": dict(chosen)[name]}
        progress(f"  {name}: data-wait share {entry['data_wait_share']['overall']:.1%}, "
                 f"step {entry['step_s']['median']:.2f} s")
    return out


# (name, numerator, denominator, with a CPU-time twin): each taken per policy, at all cores
RATIOS = (("dali_cpu_over_torch", "dali_cpu", "torch", True),
          ("dali_cpu_over_decode_bound", "dali_cpu", "bound", True),
          ("torch_over_decode_bound", "torch", "bound", False),
          ("dali_gpu_over_torch", "dali_gpu", "torch", False))


def ratio_name(key: str, policy_: str, cpu_time: bool = False) -> str:
    """"dali_cpu_over_torch" for rrc (the headline), "dali_cpu_over_torch_paper", "..._val";
    "..._cpu_time" for the CPU-time twin."""
    return key + ("" if policy_ == "rrc" else f"_{policy_}") + ("_cpu_time" if cpu_time else "")


def compute_ratios(results: dict, primary: str) -> dict:
    """The issue's ratios (images/s, wall clock) on the primary shard set, the same per shard
    set, and their CPU-time twins (CPU ms per image: hardly moved by other jobs on the machine).
    Each compares one policy with the same policy, both at all cores; the decode bound is the
    decoder alone on all cores, for the same bytes. `compared` names both sides of each ratio."""
    per, compared = {}, {}
    for corpus, by_policy in results["pairs"].items():
        block = results["decode_bound"][corpus]
        bound = {"name": f"decode bound ({block['bound_from']})", "median": block["bound"],
                 "cpu_ms_per_image": block["cpu_ms_per_image"]["median"]}
        out, names = {}, {}
        for cpu_time in (False, True):
            for key, num, den, twin in RATIOS:
                if cpu_time and not twin:
                    continue
                for p in POLICIES:
                    cases = {**by_policy.get(p, {}), "bound": bound}
                    n, d = cases.get(num), cases.get(den)
                    name = ratio_name(key, p, cpu_time)
                    # CPU time: the reference's CPU ms per image over the candidate's (> 1: cheaper)
                    out[name] = _cpu_ratio(d, n) if cpu_time else ratio(n, d)
                    names[name] = {"numerator": n and n["name"], "denominator": d and d["name"], "policy": p}
        per[corpus], compared[corpus] = out, names
    return {**per[primary], "primary_corpus": primary, "compared": compared[primary], "by_corpus": per,
            "targets": TARGETS}


def _cpu_ratio(reference: dict | None, candidate: dict | None) -> float | None:
    """reference CPU ms per image over the candidate's: > 1 when the candidate costs less."""
    if not reference or not candidate or not candidate.get("cpu_ms_per_image"):
        return None
    return round(reference["cpu_ms_per_image"] / candidate["cpu_ms_per_image"], 3)


def run(args: argparse.Namespace) -> dict:
    progress = Progress()
    cores = len(os.sched_getaffinity(0))
    settings = replace(QUICK, torch_workers=(0, cores), dali_threads=(cores,)) if args.quick else Settings()
    if args.batch_size:
        settings = replace(settings, batch_size=args.batch_size)
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    gpu = gpu_name() is not None
    staged_from = None
    if args.shards and is_remote(args.shards):
        shards_dir, staged_from = stage_remote_set(args.shards, progress)
        corpora = {"user": (shards_dir, f"your shards: {args.shards} (staged to {shards_dir})", None)}
    elif args.shards:
        shards_dir = Path(args.shards)
        if not (shards_dir / "train").is_dir():
            raise SystemExit(f"--shards {shards_dir}: no train/ split there; pass a directory written by "
                             "`python -m shards build` (or `make shards`)")
        corpora = {"user": (shards_dir, f"your shards: {shards_dir}", None)}
    else:
        spec = CorpusSpec(images=256) if args.quick else CorpusSpec()
        root = Path(args.data) / ("quick" if args.quick else "corpus")
        corpus = ensure_corpus(root, spec, progress=progress)
        corpora = {"256": (corpus.shards["256"], "ImageNet-like, packed --shorter-side 256", corpus.stats),
                   "full": (corpus.shards["full"], "ImageNet-like, packed at original size", corpus.stats)}
    crop = fit_crop(settings.crop_size, [path for path, _, _ in corpora.values()], progress)
    settings = replace(settings, crop_size=crop, e2e_crop=min(settings.e2e_crop, crop))
    e2e_note = ("e2e trains on the GPU" if gpu else "e2e trains on the CPU at a small crop: the same cores train and "
                "load, so the share shows their contention, not what a GPU would wait")
    results: dict = {
        "schema": SCHEMA, "created": dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.loader", *sys.argv[1:]]),
        "quick": bool(args.quick), "machine": machine(), "versions": versions(),
        "settings": {**asdict(settings), "profile_threads": cores, "note": e2e_note},
        "corpora": {}, "decode_bound": {}, "loaders": {}, "profile": {}, "pairs": {}, "rebuild": {},
        "end_to_end": {},
        "staging": {"remote_set": staged_from} if staged_from else {},
    }
    for label, (path, text, stats) in corpora.items():
        staging = None
        if label in ("256", "user") and (args.s3 or not args.shards) and not staged_from:
            staging = StagingBench(path, progress)
            staging.upload()
        try:
            block = bench_shards(label, path, settings, cores, gpu, reduced=label == "full", progress=progress,
                                 staging=staging)
            if staging is not None:
                results["staging"] = {"corpus": label, "server": "moto_server on 127.0.0.1 (same cores)",
                                      **staging.figures, **staging.ratios(block["loaders"], cores)}
        finally:
            if staging is not None:
                staging.close()
        results["corpora"][label] = {"shards_dir": str(path), "label": text,
                                     "description": (stats or {}).get(label)}
        results["decode_bound"][label] = block["decode_bound"]
        results["loaders"][label] = block["loaders"]
        results["profile"][label] = block["profile"]
        results["pairs"][label] = pairs(block["loaders"], cores)
    primary = "user" if args.shards else "256"
    results["rebuild"] = rebuild_cost(corpora[primary][0], settings, cores, progress)
    if stats := next(iter(corpora.values()))[2]:
        results["corpora"]["source_tree"] = {"label": "generated tree before packing", "description": stats["source"],
                                             "shards_dir": None}
    # the same pairs the ratios compare: rrc (and, in the full run, paper) with each backend
    loaders = results["loaders"][primary]
    chosen = [(e["name"], {k: v for k, v in loaders[e["name"]]["kwargs"].items() if k != "split"})
              for p in (("rrc",) if args.quick else ("rrc", "paper"))
              for side, e in results["pairs"][primary].get(p, {}).items() if side != "dali_gpu" or p == "rrc"]
    results["end_to_end"] = end_to_end(corpora[primary][0], chosen, settings, progress)
    results["ratios"] = compute_ratios(results, primary)
    if args.peers:
        from bench.peers.run import QUICK_PEERS, PeerSettings, bench_peers

        peer_settings = replace(QUICK_PEERS, crop_size=settings.crop_size) if args.quick else PeerSettings(
            batch_size=settings.batch_size, crop_size=settings.crop_size, repeats=settings.repeats)
        resize_dir = corpora["full"][0] if "full" in corpora else None
        results["peers"], results["peers_run"] = bench_peers(corpora[primary][0], peer_settings, cores, progress,
                                                             resize_dir=resize_dir)
    out_dir = Path(args.out)
    png = plot(results, out_dir / "bench.png")
    results["png"] = str(png)
    latest, stamped = write_json(results, out_dir)
    (out_dir / "latest.md").write_text(markdown(results))
    print(table(results))
    print(f"\nwrote {latest}, {stamped}, {png} and {out_dir / 'latest.md'}")
    return results


def fit_crop(crop: int, shard_dirs: list[Path], progress) -> int:
    """The crop, lowered (with a notice) where a shard set stores smaller images than it."""
    from pipeline.shardset import stored_side

    sides = [s for s in (stored_side(d, "train") for d in shard_dirs) if s]
    if sides and min(sides) < crop:
        fitted = min(sides) // 8 * 8
        if progress:
            progress(f"notice: stored images are as small as {min(sides)} px: cropping {fitted} instead of {crop}")
        return fitted
    return crop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="measure these shards instead of the generated corpus")
    parser.add_argument("--quick", action="store_true", help="about a minute: small batches, two rounds")
    parser.add_argument("--s3", action="store_true",
                        help="with --shards DIR: also read them staged from and streamed from a local S3 server "
                             "(always on for the default corpus)")
    parser.add_argument("--peers", action="store_true",
                        help="also time SPDL, LitData and the baseline on pillow-simd beside DALI and torch, "
                             "each in a side environment the bench installs (`make bench PEERS=1`)")
    parser.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    parser.add_argument("--data", default="data/bench", help="where the generated corpus is cached")
    parser.add_argument("--batch-size", type=int, help="override the batch size (default 64; quick 16)")
    parser.add_argument("--repeats", type=int, help="override the number of rounds")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"bench: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
