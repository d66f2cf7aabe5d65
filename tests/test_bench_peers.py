"""The peers' adapters (`bench.peers`) on the tiny demo shards: every loader, each in its own
process as the bench runs it, yields the same samples per epoch with the same image shape and
dtype, and its val tensors are set against the PIL reference. DALI and the torch baseline
always run; SPDL, LitData and pillow-simd only where their side environment is installed
(`make bench PEERS=1` installs them under ~/.cache/alexnet-dali/peers), and skip with the
reason otherwise. No timing assertions (speed goes to the bench)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.figures import figure
from bench.peers import report
from bench.peers.check import mad_against_pil, run_check, same_counts
from bench.peers.install import DEFAULT_DIR, PINS, ROOT, PeerEnv, last_line, probe, site_dir
from bench.peers.run import TARGET, compare, pack_litdata
from bench.peers.source import ChildLoader, tree_peak_mib
from bench.peers.tars import read_samples, read_tar, split_tars
from bench.peers.transforms import BatchNormalise, rrc_filter, shorter_side_size, val_filter
from bench.timing import measure_interleaved
from bench.views import shard_view
from pipeline.shardset import open_split
from pipeline.stats import read_stats
from pipeline.torch_transforms import Normalise, resize_shorter

CROP, BATCH = 56, 16  # the demo shards are stored at shorter side 64: base side 64 for a 56 crop
PLAIN = PeerEnv("plain", None, False, None, "the project's .venv")


def installed(name: str) -> PeerEnv | None:
    """The peer's side environment where `make bench PEERS=1` left it and its probe passes."""
    site = site_dir(DEFAULT_DIR, "simd" if name == "torch-pillow-simd" else name, PINS[name])
    if not (site / ".installed").is_file():
        return None
    env = PeerEnv(name, site, name == "torch-pillow-simd", None, "test")
    return env if probe(env) is None else None


def spec(shards, loader: str, split: str, **extra) -> dict:
    return {"loader": loader, "shards_dir": str(shards), "split": split, "batch_size": BATCH, "crop_size": CROP,
            "threads": 2, "seed": 0, **extra}


@pytest.fixture(scope="module")
def view(demo_shards, tmp_path_factory):
    """The demo set as the bench reads it: `train` and `val` both hold its train tars (LitData's
    chunks are written once from them, for both graphs)."""
    return shard_view(demo_shards, tmp_path_factory.mktemp("view") / "set", {"train": "train", "val": "train"})


@pytest.fixture(scope="module")
def checks(view, tmp_path_factory) -> dict:
    """{loader: {split: check, "val_npz": path}} for DALI, torch and every installed peer."""
    tmp = tmp_path_factory.mktemp("peers")
    envs = {"dali": PLAIN, "torch": PLAIN}
    for name in ("spdl", "litdata", "torch-pillow-simd"):
        if env := installed(name):
            envs[name] = env
    extra = {}
    if "litdata" in envs:
        pack = pack_litdata(envs["litdata"], view, tmp / "litdata", 1, tmp / "pack.log")
        extra = {"litdata_dir": str(tmp / "litdata"), "pack": pack}
    out = {}
    for name, env in envs.items():
        out[name] = {}
        for split in ("train", "val"):
            npz = tmp / f"{name}-{split}.npz"
            out[name][split] = run_check(name, spec(view, name, split, litdata_dir=extra.get("litdata_dir")),
                                         env.pythonpath(), npz, 8, tmp / f"{name}.log", timeout=300)
            out[name][f"{split}_npz"] = npz
    out["_litdata_pack"] = extra.get("pack")
    return out


def loaders(checks: dict) -> list[str]:
    return [n for n in checks if not n.startswith("_")]


def test_every_loader_yields_the_same_samples_shapes_and_dtypes(checks, view) -> None:
    train, val = (open_split(view, s).num_samples for s in ("train", "val"))
    for name in loaders(checks):
        c = checks[name]
        assert c["train"]["samples"] == train // BATCH * BATCH == c["train"]["expected"], (name, c["train"])
        assert c["val"]["samples"] == val == c["val"]["expected"], (name, c["val"])
        for split in ("train", "val"):
            assert c[split]["unique_keys"] == c[split]["samples"], (name, split)  # no sample twice
            assert c[split]["image_shape"] == [3, CROP, CROP], (name, split)
            assert c[split]["image_dtype"] == "torch.float32" and c[split]["label_dtype"] == "torch.int64"
    assert all(v["same"] for v in same_counts({n: checks[n] for n in loaders(checks)}).values())


def test_val_tensors_match_the_pil_reference(checks, view) -> None:
    """The baseline is the reference itself; DALI and SPDL decode and resize with their own
    code, close to it; LitData and pillow-simd run the same chain on libjpeg-turbo."""
    bounds = {"torch": 0.0, "litdata": 0.0, "dali": 4.0, "spdl": 6.0, "torch-pillow-simd": 2.0}
    for name in loaders(checks):
        mad = mad_against_pil(checks[name]["val_npz"], view, "val", CROP)
        assert mad["samples"] == 8, (name, mad)
        assert mad["mad_pixel_levels"] <= bounds[name], (name, mad)


@pytest.mark.parametrize("peer", ["spdl", "litdata", "torch-pillow-simd"])
def test_each_peer_matches_dali(checks, view, peer) -> None:
    if peer not in checks:
        pytest.skip(f"{peer} is not installed here: `make bench PEERS=1` installs it under {DEFAULT_DIR}"
                    + (" (SPDL also needs FFmpeg's shared libraries)" if peer == "spdl" else ""))
    for split in ("train", "val"):
        mine, dali = checks[peer][split], checks["dali"][split]
        assert (mine["samples"], mine["batches"], mine["image_shape"], mine["image_dtype"]) == \
            (dali["samples"], dali["batches"], dali["image_shape"], dali["image_dtype"]), (peer, split)
    if peer == "litdata":  # optimize() wrote every train sample once
        assert checks["_litdata_pack"]["images"] == open_split(view, "train").num_samples


def test_the_child_serves_passes_and_reports_its_memory(demo_shards, tmp_path) -> None:
    child = ChildLoader("dali train", spec(demo_shards, "dali", "train"), str(ROOT), tmp_path / "child.log")
    try:
        child.start()
        assert child.ready["num_samples"] == open_split(demo_shards, "train").num_samples // BATCH * BATCH
        assert child.ready["settings"]["num_threads"] == 2 and child.ready["settings"]["lighting"] is False
        timed = measure_interleaved([child.source(0, {})], warmup=1, window=3, repeats=2, settle_s=0.0,
                                    progress=lambda _: None)
        assert len(timed["dali train"]["images_per_s"]["runs"]) == 2
        assert child.peak_rss_mib > 0 and tree_peak_mib(child.proc.pid) >= child.peak_rss_mib * 0.5
    finally:
        child.close()


def test_tar_samples_are_the_sets_samples(demo_shards) -> None:
    tars = split_tars(demo_shards, "train")
    samples = [s for t in tars for s in read_tar(t)]
    assert len(samples) == open_split(demo_shards, "train").num_samples
    keys = [k for k, _, _ in samples]
    assert len(set(keys)) == len(keys)
    classes = len(json.loads((demo_shards / "classes.json").read_text()))
    assert all(0 <= label < classes for _, _, label in samples)
    some = read_samples(demo_shards, "train", set(keys[:3]))
    assert set(some) == set(keys[:3]) and all(Image.open(io.BytesIO(b)).size for b, _ in some.values())


def test_spdl_filters_state_the_same_windows_and_sizes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        desc = rrc_filter(500, 375, 224, (0.08, 1.0), rng)
        crop, scale = desc.split(",")[:2]
        w, h, x, y = (int(v) for v in crop.removeprefix("crop=").split(":"))
        assert 0 < w and x + w <= 500 and 0 < h and y + h <= 375
        assert scale == "scale=224:224:flags=bilinear"
        assert desc.endswith("format=pix_fmts=rgb24")
    img = Image.new("RGB", (500, 333))
    assert shorter_side_size(500, 333, 256) == resize_shorter(img, 256).size
    assert shorter_side_size(333, 500, 256) == resize_shorter(Image.new("RGB", (333, 500)), 256).size
    assert val_filter(500, 333, 224, 256).startswith(f"scale={resize_shorter(img, 256).width}:256:")


def test_batch_normalise_matches_the_baselines_normalise(demo_shards) -> None:
    stats = read_stats(demo_shards)
    pixels = np.random.default_rng(1).integers(0, 256, (4, CROP, CROP, 3), dtype=np.uint8)
    batch = BatchNormalise(stats)(torch.from_numpy(pixels))
    ref = np.stack([Normalise(stats, lighting=False)(p, np.random.default_rng(0)) for p in pixels])
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, CROP, CROP) and batch.is_contiguous()
    np.testing.assert_allclose(batch.numpy(), ref, rtol=1e-5, atol=1e-5)


def _entry(train: float, val: float, cpu: float) -> dict:
    figs = {s: {"images_per_s": figure([r, r]), "cpu_ms_per_image": figure([cpu, cpu], "ms")}
            for s, r in (("train", train), ("val", val))}
    return {"figures": figs, "train_images_per_s": train, "val_images_per_s": val, "cpu_s_per_image": cpu / 1000,
            "peak_rss_mb": 100.0, "version": "x 1", "samples_per_epoch": {"train": 64, "val": 64},
            "val_vs_pil": {"stored_set": {"mad_pixel_levels": 0.5}}}


def test_ratios_pick_the_best_peer_and_judge_the_target() -> None:
    peers = {"dali": _entry(600, 1200, 1.5), "torch": _entry(200, 300, 4.0), "spdl": _entry(400, 1000, 3.0)}
    out = compare(peers)
    assert out["dali_over"]["torch"]["train"] == 3.0 and out["dali_over"]["spdl"]["train"] == 1.5
    assert out["dali_over"]["spdl"]["train_cpu_time"] == 2.0
    assert out["best_peer"] == {"train": "spdl", "val": "spdl"}
    assert out["dali_over_best_peer"] == {"train": 1.5, "val": 1.2}
    assert out["target_met"] == {"train": 1.5 >= TARGET, "val": 1.2 >= TARGET}
    run = {"settings": {"batch_size": 64, "crop_size": 224, "repeats": 3}, "cores": 2, "shards_dir": "s",
           "installs": {"spdl": "pip --target x"}, "skipped": {"torch-pillow-simd": "no compiler"},
           "litdata_pack": None, "same_samples": same_counts({n: {s: {"samples": 64} for s in ("train", "val")}
                                                              for n in peers}), "target": TARGET, **out}
    text = "\n".join(report.markdown({"peers": peers, "peers_run": run}))
    assert "| spdl | x 1 | 400 (400-400) |" in text and "torch-pillow-simd: not measured: no compiler" in text
    assert "train: best peer spdl; DALI CPU / spdl = 1.50 (target 1.3: met)" in text


def test_install_reports_the_telling_line_and_orders_the_path(tmp_path) -> None:
    assert last_line("Collecting x\nerror: command 'gcc' failed\nnote: see above\n") == "error: command 'gcc' failed"
    assert site_dir(tmp_path, "spdl", PINS["spdl"]) != site_dir(tmp_path, "spdl", ("spdl==0.9.0",))
    simd = PeerEnv("torch-pillow-simd", tmp_path / "simd", True, "1", "how")
    spdl = PeerEnv("spdl", tmp_path / "spdl", False, "1", "how")
    assert simd.pythonpath().split(":") == [str(tmp_path / "simd"), str(ROOT)]
    assert spdl.pythonpath().split(":") == [str(ROOT), str(tmp_path / "spdl")]


def test_the_gpu_peers_step_names_the_peers_it_cannot_run(demo_shards) -> None:
    """Here neither nvImageCodec nor SPDL imports in this process (SPDL lives in its side
    environment): `make gpu-check`'s peers step gets both reasons and times nothing."""
    from bench.gpu_peers import PEERS, measure

    out = measure(demo_shards, BATCH, CROP, 2, 32, 1, 1, 1, progress=lambda _: None)
    assert out["loaders"] == {} and set(out["skipped"]) == set(PEERS)
    assert all(why for why in out["skipped"].values())


def test_the_gpu_rrc_work_gives_the_crop_normalised() -> None:
    from bench.gpu_peers import gpu_rrc

    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((64, 80), (90, 60))]
    mean, std = torch.full((1, 3, 1, 1), 127.5), torch.full((1, 3, 1, 1), 64.0)
    out = gpu_rrc(images, CROP, np.random.default_rng(0), mean, std)
    assert out.shape == (2, 3, CROP, CROP) and out.dtype == torch.float32
    assert -2.0 <= float(out.min()) and float(out.max()) <= 2.0
