"""`python -m bench.loader`: the quick run writes every JSON field and the PNG; the corpus is
deterministic, ImageNet-like and cached; the quick side-by-side check prints every case. No
timing assertions (speed goes to the bench)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.corpus import SIZE_MIX, CorpusSpec, ensure_corpus, image_size, synth_image
from bench.figures import figure
from bench.loader.measure import CASES
from bench.loader.measure import main as measure_main
from bench.loader.profile import PROFILE_STAGES

ROOT = Path(__file__).resolve().parents[1]
FIGURE_KEYS = {"median", "min", "max", "spread", "runs", "unit"}


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench.loader", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_figure(fig: dict, repeats: int, unit: str = "images/s") -> None:
    assert set(fig) >= FIGURE_KEYS, fig
    assert fig["unit"] == unit
    assert len(fig["runs"]) == repeats
    assert 0 < fig["min"] <= fig["median"] <= fig["max"]
    assert fig["spread"] == pytest.approx((fig["max"] - fig["min"]) / fig["median"], rel=1e-3, abs=1e-4)


def test_quick_bench_writes_every_field_and_the_png(demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_bench("--quick", "--s3", "--shards", str(demo_shards), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = out / "latest.json"
    res = json.loads(latest.read_text())
    stamped = sorted(out.glob("bench-*.json"))
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == res

    assert res["schema"] == 2 and res["quick"] is True
    cores = res["machine"]["cores"]
    assert cores == len(os.sched_getaffinity(0)) and res["machine"]["cpu_model"]
    assert "gpu" in res["machine"] and res["machine"]["memory_gib"] > 0
    for dist in ("python", "torch", "webdataset", "pillow", "numpy", "libjpeg_turbo"):
        assert res["versions"][dist]
    assert any(k.startswith("nvidia-dali") for k in res["versions"])
    repeats = res["settings"]["repeats"]
    assert repeats >= 2

    assert list(res["corpora"]) == ["user"] and res["corpora"]["user"]["shards_dir"] == str(demo_shards)
    bound = res["decode_bound"]["user"]
    for name in ("decode pil 1 process", f"decode pil {cores} processes"):  # forked, outside the rounds
        check_figure(bound["measured"][name]["images_per_s"], repeats)
    for name in ("decode pil 1 thread", "decode dali cpu 1 thread", f"decode dali cpu {cores} threads"):
        check_figure(bound["measured"][name]["images_per_s"], repeats)
        check_figure(bound["measured"][name]["cpu_ms_per_image"], repeats, unit="ms")
    assert bound["bound"] == pytest.approx(bound["bound_per_core"]["median"] * cores, rel=1e-3)
    assert bound["bound_from"].endswith(f"x {cores} cores")
    check_figure(bound["cpu_ms_per_image"], repeats, unit="ms")

    loaders = res["loaders"]["user"]
    # quick: torch rrc at 0 and all-cores workers, every other case at all cores (the default run
    # adds the sweeps); every policy (rrc, paper, val) with both backends
    threads = f"{cores} thread{'' if cores == 1 else 's'}"
    expected = {f"torch rrc {w} worker{'' if w == 1 else 's'}" for w in (0, cores)}
    expected |= {f"torch {p} {cores} worker{'' if cores == 1 else 's'}" for p in ("paper", "val")}
    expected |= {f"dali cpu {p} {threads}" for p in ("rrc", "paper", "val")}
    # --s3: the same shards staged from and streamed from a local S3 server, in the same rounds
    expected |= {f"s3 {how}: dali cpu rrc {threads}" for how in ("staged", "streamed")}
    assert set(loaders) == expected
    for name, entry in loaders.items():
        check_figure(entry["images_per_s"], repeats)
        check_figure(entry["first_batch_s"], repeats, unit="s")
        check_figure(entry["cpu_ms_per_image"], repeats, unit="ms")
        assert entry["kwargs"]["backend"] in ("torch", "dali")
        assert entry["kwargs"]["split"] == ("val" if " val " in name else "train")
    profile = res["profile"]["user"]
    assert list(profile) == list(PROFILE_STAGES) and res["settings"]["profile_threads"] == cores
    for entry in profile.values():
        check_figure(entry["images_per_s"], repeats)
        check_figure(entry["cpu_ms_per_image"], repeats, unit="ms")

    pairs = res["pairs"]["user"]
    assert list(pairs) == ["rrc", "paper", "val"]
    for pol, pair in pairs.items():
        assert set(pair) == {"torch", "dali_cpu"}  # no GPU here
        for side, entry in pair.items():
            kwargs = loaders[entry["name"]]["kwargs"]
            assert kwargs["num_threads"] == cores and kwargs["backend"] == side.split("_")[0]
            assert (kwargs["split"] == "val") if pol == "val" else (kwargs["split"], kwargs["crop"]) == ("train", pol)
            assert entry["median"] == loaders[entry["name"]]["images_per_s"]["median"]
    # the end-to-end run trains with the rrc pair the headline compares
    assert set(res["end_to_end"]) == {pairs["rrc"]["torch"]["name"], pairs["rrc"]["dali_cpu"]["name"]}
    for entry in res["end_to_end"].values():
        share = entry["data_wait_share"]
        check_figure(share, min(repeats, res["settings"]["e2e_steps"]), unit="fraction")
        assert 0 < share["overall"] < 1 and share["max"] <= 1
        check_figure(entry["step_s"], res["settings"]["e2e_steps"], unit="s")
        assert entry["images_per_s"] > 0

    staging = res["staging"]
    train_bytes = sum(p.stat().st_size for p in (demo_shards / "train").glob("*.tar"))
    assert staging["staged_bytes"] == train_bytes and staging["stage_mb_per_s"] > 0
    assert staging["stage_images_per_s"] > 0 and staging["upload_mb_per_s"] > 0
    assert 0 < staging["staged_over_local"] and 0 < staging["streamed_over_local"]
    assert "staged_over_local" in proc.stdout

    ratios = res["ratios"]
    bound_name = f"decode bound ({bound['bound_from']})"
    for pol, suffix in (("rrc", ""), ("paper", "_paper"), ("val", "_val")):
        for key in ("dali_cpu_over_torch", "dali_cpu_over_decode_bound", "torch_over_decode_bound",
                    "dali_cpu_over_torch_cpu_time", "dali_cpu_over_decode_bound_cpu_time"):
            name = key.replace("_cpu_time", suffix + "_cpu_time") if key.endswith("_cpu_time") else key + suffix
            assert isinstance(ratios[name], float) and ratios[name] > 0, name
            assert ratios["compared"][name]["policy"] == pol
        assert ratios["dali_gpu_over_torch" + suffix] is None
        assert ratios["dali_cpu_over_torch" + suffix] == pytest.approx(
            pairs[pol]["dali_cpu"]["median"] / pairs[pol]["torch"]["median"], rel=1e-2)
        assert ratios["dali_cpu_over_decode_bound" + suffix] == pytest.approx(
            pairs[pol]["dali_cpu"]["median"] / bound["bound"], rel=1e-2)
        assert ratios["dali_cpu_over_torch" + suffix + "_cpu_time"] == pytest.approx(
            pairs[pol]["torch"]["cpu_ms_per_image"] / pairs[pol]["dali_cpu"]["cpu_ms_per_image"], rel=1e-2)
    # like for like: both sides of every ratio run the ratio's policy, at all cores; a decode
    # bound denominator is the decoder alone on all cores
    ratio_keys = {k for k, v in ratios.items() if not isinstance(v, (dict, str))}
    assert ratio_keys == set(ratios["compared"])
    for key, sides in ratios["compared"].items():
        for name in (sides["numerator"], sides["denominator"]):
            if name is None:
                assert ratios[key] is None  # the GPU side, absent here
            elif name.startswith("decode bound"):
                assert name == bound_name and name.endswith(f"x {cores} cores)")
            else:
                kwargs = loaders[name]["kwargs"]
                assert kwargs["num_threads"] == cores, (key, name)
                assert ("val" if kwargs["split"] == "val" else kwargs["crop"]) == sides["policy"], (key, name)
    assert ratios["targets"] == {"dali_cpu_over_torch": 1.5, "dali_cpu_over_decode_bound": 0.85}

    # what starting a pass costs the train loader: passes 2..N against a whole pass, and memory
    rebuild = res["rebuild"]
    passes = rebuild["passes"]
    assert passes == res["settings"]["rebuild_passes"] == 10
    assert rebuild["kwargs"] == {"backend": "dali", "device": "cpu", "split": "train", "crop": "rrc",
                                 "num_threads": cores}
    for key in ("first_batch_s", "pass_s", "batch_s"):
        check_figure(rebuild[key], passes - 1, unit="s")
    check_figure(rebuild["steady_images_per_s"], passes - 1)
    assert rebuild["first_batch_s"]["median"] < rebuild["pass_s"]["median"]
    assert rebuild["images_per_pass"] == rebuild["batches_per_pass"] * rebuild["batch_size"]
    assert 0 <= rebuild["rebuild_share"] < rebuild["first_batch_share"] < 1
    assert 0 <= rebuild["imagenet_epoch_share"] < rebuild["rebuild_share"]
    assert len(rebuild["rss_mib"]) == passes and min(rebuild["rss_mib"]) > 0
    assert rebuild["rss_after_pass_2_mib"] == rebuild["rss_mib"][1]
    assert rebuild["rss_growth_mib"] == pytest.approx(rebuild["rss_mib"][-1] - rebuild["rss_mib"][1], abs=0.11)
    slope = np.polyfit(range(passes - 1), rebuild["rss_mib"][1:], 1)[0]
    assert rebuild["rss_slope_mib_per_pass"] == pytest.approx(slope, abs=0.006)

    png = Path(res["png"])
    assert png == out / "bench.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.width > 500 and im.height > 300
    assert "dali_cpu_over_torch" in proc.stdout and "images/s" in proc.stdout
    md = (out / "latest.md").read_text()
    assert "| `dali_cpu_over_decode_bound` |" in md and "| rrc (default) | paper | val |" in md
    assert "Starting a pass" in md and "RSS after pass 2" in md
    assert "round 1/" in proc.stderr  # progress is shown while it runs


def test_bench_refuses_a_missing_shard_dir_in_one_line(tmp_path: Path) -> None:
    proc = run_bench("--quick", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nope") in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_corpus_images_are_deterministic_and_imagenet_like() -> None:
    first = synth_image(7, seed=0)
    assert np.array_equal(np.asarray(first), np.asarray(synth_image(7, seed=0)))
    assert not np.array_equal(np.asarray(first), np.asarray(synth_image(7, seed=1)))
    sizes = []
    for index in range(12):
        buf = io.BytesIO()
        img = synth_image(index)
        if img.size == (500, 375):
            img.save(buf, "JPEG", quality=90)
            sizes.append(len(buf.getvalue()))
    assert sizes and 60_000 < np.median(sizes) < 160_000  # ImageNet: ~110 KB for a 500x375 photo


def test_corpus_size_mix_follows_imagenet() -> None:
    rng = np.random.default_rng(0)
    dims = [image_size(rng) for _ in range(4000)]
    share = {wh: dims.count(wh) / len(dims) for wh in {(500, 375), (375, 500), (500, 333)}}
    weights = {(w, h): p for w, h, p in SIZE_MIX if isinstance(w, int)}
    total = sum(p for _, _, p in SIZE_MIX)
    for wh, got in share.items():
        assert got == pytest.approx(weights[wh] / total, abs=0.03)
    assert min(min(w, h) for w, h in dims) >= 256  # the loader crops 224 from the unresized set
    assert max(max(w, h) for w, h in dims) > 1000  # a few very large photos, as ImageNet has


def test_corpus_is_cached_by_fingerprint(tmp_path: Path) -> None:
    spec = CorpusSpec(images=24, classes=3, shard_size_mb=1)
    corpus = ensure_corpus(tmp_path / "c", spec, workers=1, progress=lambda m: None)
    for name in ("256", "full"):
        assert sorted((corpus.shards[name] / "train").glob("*.tar"))
        assert corpus.stats[name]["images"] == 24
    assert corpus.stats["256"]["width_mean"] < corpus.stats["full"]["width_mean"]
    stamp = (corpus.root / "corpus.json").stat().st_mtime_ns
    said = []
    again = ensure_corpus(tmp_path / "c", spec, workers=1, progress=said.append)
    assert again.stats == corpus.stats and (corpus.root / "corpus.json").stat().st_mtime_ns == stamp
    assert "reusing" in said[0]
    assert CorpusSpec(images=25).fingerprint() != CorpusSpec(images=24).fingerprint()


def test_figure_reports_median_and_spread() -> None:
    fig = figure([100.0, 300.0, 200.0])
    assert fig["median"] == 200.0 and fig["min"] == 100.0 and fig["max"] == 300.0 and fig["spread"] == 1.0
    with pytest.raises(ValueError):
        figure([])


def test_sources_roll_over_epochs_and_leave_restarts_untimed() -> None:
    import torch

    from bench.timing import loader_source, measure_interleaved, time_window

    epoch = [(torch.zeros(4, 3, 2, 2), torch.zeros(4)), (torch.zeros(3, 3, 2, 2), torch.zeros(3))]
    source = loader_source("list", epoch)
    batches = source.open()
    assert [next(batches) for _ in range(5)] == [(4, False), (3, True), (4, False), (3, True), (4, False)]
    batches.close()
    rate, first, cpu_ms = time_window(source.open(), warmup=1, window=3)
    assert rate > 0 and first >= 0 and cpu_ms >= 0
    said = []
    timed = measure_interleaved([source], warmup=1, window=2, repeats=2, settle_s=0, progress=said.append)
    assert set(timed["list"]) == {"images_per_s", "first_batch_s", "cpu_ms_per_image"} and len(said) == 2


def test_measure_prints_every_case_against_torch(demo_shards, capsys):
    """`python -m bench.loader.measure`, the quick side-by-side check: every case against torch."""
    measure_main(["--shards", str(demo_shards), "--batch-size", "8", "--batches", "1", "--repeats", "1",
                  "--crop-size", "56", "--threads", "1"])
    table = capsys.readouterr().out.split("vs torch\n")[1].splitlines()
    assert [line.split("  ")[0].strip() for line in table] == [name for name, *_ in CASES]
    assert all(line.endswith("x") for line in table)
    with pytest.raises(SystemExit, match="does not exist"):
        measure_main(["--shards", str(demo_shards / "nowhere")])
