"""The peers' run (`python -m bench.loader --peers`): install the peers' side environments,
write LitData's chunks (timed: its packing cost), start every loader in its own process for
the train and the val graph, time them all in the same interleaved rounds (`bench.timing`),
then check each one's samples per epoch and its val tensors against the PIL reference, and
return the `peers` block of latest.json (DESIGN.md "Benchmark output") with the run's own
facts beside it (`peers_run`: installs, skipped peers and why, the packing cost, the checks,
the DALI/peer ratios and the target).

Every loader reads the same tars: a view of the set whose `train` and `val` both hold the
set's train tars (the val graph decodes the very bytes the train graph does, as in the main
bench), and LitData reads chunks written from those tars.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from bench.figures import ratio
from bench.peers.check import mad_against_pil, run_check, same_counts
from bench.peers.install import DEFAULT_DIR, PINS, ROOT, PeerEnv, ensure_peers
from bench.peers.loaders import LOADERS
from bench.peers.source import ChildLoader
from bench.timing import measure_interleaved
from bench.views import shard_view

TARGET = 1.3  # DALI CPU over the best peer, like for like (issue 27)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PeerSettings:
    batch_size: int = 64
    crop_size: int = 224
    warmup: int = 2  # untimed batches each round (plus one per DataLoader worker where there are workers)
    window: int = 8  # timed batches per round
    repeats: int = 3
    settle_s: float = 0.1
    keep: int = 16  # val samples per loader compared with the PIL reference


QUICK_PEERS = PeerSettings(batch_size=16, warmup=1, window=2, repeats=2, settle_s=0.0, keep=8)
WORKER_LOADERS = ("torch", "torch-pillow-simd", "litdata")  # DataLoader workers: their first burst is warm-up


def versions(envs: dict[str, PeerEnv]) -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    dali = next((f"nvidia-dali {dist(d)} ({d})" for d in ("nvidia-dali-cuda120", "nvidia-dali-cuda130")
                 if dist(d) != "not installed"), "nvidia-dali not installed")
    out = {"dali": dali, "torch": f"torch {dist('torch')}, webdataset {dist('webdataset')}, pillow {dist('pillow')}"}
    for name, env in envs.items():
        label = {"torch-pillow-simd": "pillow-simd"}.get(name, name)
        out[name] = f"{label} {env.version}" + (f", torch {dist('torch')}" if name != "spdl" else "")
    return out


def pack_litdata(env: PeerEnv, view: Path, out: Path, workers: int, log: Path) -> dict:
    """LitData's optimize() over the view's train tars, in a child with its environment."""
    code = ("import json, sys; from pathlib import Path; from bench.peers.litdata_loader import optimize_set; "
            "from bench.peers.tars import split_tars; "
            "print(json.dumps(optimize_set(split_tars(sys.argv[1], 'train'), Path(sys.argv[2]), int(sys.argv[3]))))")
    with log.open("ab") as err:
        proc = subprocess.run([sys.executable, "-c", code, str(view), str(out), str(workers)], stdout=subprocess.PIPE,
                              stderr=err, text=True, env={**os.environ, "PYTHONPATH": env.pythonpath()}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"litdata: optimize() failed (exit {proc.returncode}); {log}:\n"
                           f"{log.read_text(errors='replace')[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_peers(shards_dir: Path, settings: PeerSettings, cores: int, progress, names: tuple[str, ...] = LOADERS,
                install_dir: Path = DEFAULT_DIR, resize_dir: Path | None = None) -> tuple[dict, dict]:
    """(peers, peers_run): see the module's docstring. `resize_dir`: a set stored larger than
    the base side (the bench's original-size set), where the val graph must resize: each
    loader's val tensors on its first samples are compared with PIL's there too."""
    envs = ensure_peers([n for n in names if n in PINS], install_dir, progress)
    skipped = {n: e.error for n, e in envs.items() if not e.ok}
    measured = [n for n in names if n not in skipped]
    plain = PeerEnv("plain", None, False, None, "the project's .venv (make setup)")
    env_of = {n: envs.get(n, plain) for n in measured}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        view = shard_view(shards_dir, work / "set", {"train": "train", "val": "train"})
        pack = None
        litdata_dir = work / "litdata"
        if "litdata" in measured:
            progress(f"peers: litdata optimize() of {view} with {cores} workers (timed: its packing cost)")
            pack = pack_litdata(env_of["litdata"], view, litdata_dir, cores, logs / "litdata-pack.log")
            progress(f"peers: litdata packed {pack['images']} images into {pack['chunks']} chunks in "
                     f"{pack['seconds']} s ({pack['images_per_s']} images/s)")
        base = {"shards_dir": str(view), "batch_size": settings.batch_size, "crop_size": settings.crop_size,
                "threads": cores, "seed": 0, "litdata_dir": str(litdata_dir)}
        children = {(n, s): ChildLoader(f"{n} {s}", {**base, "loader": n, "split": s}, env_of[n].pythonpath(),
                                        logs / f"{n}-{s}.log") for s in SPLITS for n in measured}
        try:
            for (n, s), child in children.items():
                progress(f"peers: starting {n} {s} in its own process")
                child.start()
            sources = [c.source(cores if n in WORKER_LOADERS else 0, {"loader": n, "split": s})
                       for (n, s), c in children.items()]
            progress(f"peers: timing {len(sources)} loaders: {settings.repeats} rounds x ({settings.warmup} warm-up "
                     f"+ {settings.window} timed batches of {settings.batch_size}), {cores} threads/workers each")
            timed = measure_interleaved(sources, settings.warmup, settings.window, settings.repeats,
                                        settings.settle_s, progress)
        finally:
            for child in children.values():
                child.close()
        checks: dict[str, dict] = {n: {} for n in measured}
        mads = {}
        for n in measured:
            for s in SPLITS:
                progress(f"peers: checking one epoch of {n} {s}")
                npz = work / f"{n}-{s}.npz"
                checks[n][s] = run_check(n, {**base, "loader": n, "split": s}, env_of[n].pythonpath(), npz,
                                         settings.keep, logs / f"{n}-{s}-check.log")
            mads[n] = {"stored_set": mad_against_pil(work / f"{n}-val.npz", view, "val", settings.crop_size)}
        if resize_dir is not None:
            mads = resized_mads(resize_dir, measured, env_of, base, settings, work, progress, mads)
        progress("peers: PIL's and SPDL's decode paths stage by stage, one thread (bench.peers.stages)")
        stages = cpu_stages(view, settings, env_of.get("spdl", plain), logs / "stages.log")
    vers = versions(envs)
    peers = {}
    for n in measured:
        t, v = timed[f"{n} train"], timed[f"{n} val"]
        peers[n] = {
            "train_images_per_s": t["images_per_s"]["median"],
            "val_images_per_s": v["images_per_s"]["median"],
            "cpu_s_per_image": round(t["cpu_ms_per_image"]["median"] / 1000, 6),
            "val_cpu_s_per_image": round(v["cpu_ms_per_image"]["median"] / 1000, 6),
            "peak_rss_mb": max(children[(n, s)].peak_rss_mib for s in SPLITS),
            "settings": {**children[(n, "train")].ready["settings"], "batch_size": settings.batch_size,
                         "crop_size": settings.crop_size, "cores": cores},
            "version": vers.get(n, ""),
            "install": env_of[n].method,
            "figures": {s: timed[f"{n} {s}"] for s in SPLITS},
            "peak_rss_mb_by_split": {s: children[(n, s)].peak_rss_mib for s in SPLITS},
            "samples_per_epoch": {s: checks[n][s]["samples"] for s in SPLITS},
            "check": checks[n],
            "val_vs_pil": mads[n],
        }
    run = {
        "shards_dir": str(shards_dir), "cores": cores, "settings": asdict(settings), "target": TARGET,
        "installs": {n: e.method for n, e in envs.items()}, "skipped": skipped,
        "install_dir": str(install_dir), "litdata_pack": pack, "same_samples": same_counts(checks),
        "python_path_root": str(ROOT), "stages": stages,
        "note": ("each loader runs in its own process (bench.peers.child) with threads/workers = cores; "
                 "peak_rss_mb: MiB, the sum of VmHWM over the loader's process and its workers; "
                 "no PCA lighting on any side (no peer has it)"),
    }
    run.update(compare(peers))
    return peers, run


def cpu_stages(view: Path, settings: PeerSettings, env: PeerEnv, log: Path) -> dict:
    """`bench.peers.stages` in a child with SPDL's environment (PIL alone where SPDL is not)."""
    images = 32 if settings.repeats < 3 else 128
    with log.open("ab") as err:
        proc = subprocess.run([sys.executable, "-m", "bench.peers.stages", str(view), str(images),
                               str(settings.crop_size)], stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "PYTHONPATH": env.pythonpath()}, timeout=600)
    if proc.returncode != 0:
        return {"error": f"bench.peers.stages exited {proc.returncode}; see {log}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resized_mads(resize_dir: Path, measured: list[str], env_of: dict, base: dict, settings: PeerSettings,
                 work: Path, progress, mads: dict) -> dict:
    """Each loader's val graph on the first samples of `resize_dir` (where the shorter side is
    resized), against PIL's: the resize filters' difference, which a set stored at the base
    side never shows."""
    small = shard_view(resize_dir, work / "resize-set", {"train": "train", "val": "train"}, settings.keep)
    spec = {**base, "shards_dir": str(small), "split": "val", "batch_size": settings.keep,
            "litdata_dir": str(work / "resize-litdata")}
    if "litdata" in measured:
        pack_litdata(env_of["litdata"], small, work / "resize-litdata", 1, work / "logs" / "litdata-resize.log")
    for n in measured:
        progress(f"peers: {n} val on {resize_dir} (stored larger: the val graph resizes) against PIL")
        npz = work / f"{n}-resize.npz"
        run_check(n, {**spec, "loader": n}, env_of[n].pythonpath(), npz, settings.keep,
                  work / "logs" / f"{n}-resize.log")
        mads[n]["resized_set"] = mad_against_pil(npz, small, "val", settings.crop_size)
    return mads


def compare(peers: dict) -> dict:
    """DALI over each peer (images/s, and in CPU time: the peer's CPU per image over DALI's),
    the best peer per split and DALI over it, against the target."""
    if "dali" not in peers:
        return {"dali_over": {}, "best_peer": {}, "dali_over_best_peer": {}}
    dali = peers["dali"]
    over = {}
    for n, p in peers.items():
        if n == "dali":
            continue
        over[n] = {s: ratio(dali["figures"][s]["images_per_s"], p["figures"][s]["images_per_s"]) for s in SPLITS}
        over[n].update({f"{s}_cpu_time": round(p["figures"][s]["cpu_ms_per_image"]["median"]
                                               / dali["figures"][s]["cpu_ms_per_image"]["median"], 3)
                        for s in SPLITS})
    best = {s: max((n for n in peers if n != "dali"), key=lambda n: peers[n][f"{s}_images_per_s"], default=None)
            for s in SPLITS}
    best_ratio = {s: over[best[s]][s] if best[s] else None for s in SPLITS}
    return {"dali_over": over, "best_peer": best, "dali_over_best_peer": best_ratio,
            "target_met": {s: r is not None and r >= TARGET for s, r in best_ratio.items()}}
