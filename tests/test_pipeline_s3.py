"""Remote shard sets through the node-local cache, against a real S3 server on loopback
(moto), real DALI (CPU) and the demo_shards fixture uploaded as the packer left it."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import make_loader
from pipeline.staging import mirror_dir
from shards.location import StorageError, resolve

ARGS = dict(batch_size=16, device="cpu", crop_size=56, num_threads=1)


def upload(local: Path, server, uri: str) -> None:
    pafs.copy_files(str(local), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=server.filesystem())


@pytest.fixture()
def remote_set(demo_shards, s3_server, s3_bucket) -> str:
    uri = f"{s3_bucket}/demo"
    upload(demo_shards, s3_server, uri)
    return uri


def keys_and_labels(loader) -> tuple[list[str], list[int]]:
    keys, labels = [], []
    for _, lab, k in loader:
        keys += k
        labels += lab.tolist()
    return keys, labels


def test_remote_set_reads_like_the_local_copy(demo_shards, remote_set, tmp_path):
    cache = tmp_path / "cache"
    for split, rank in (("val", 0), ("val", 1), ("train", 1)):
        local = make_loader(str(demo_shards), split, rank=rank, world_size=2, return_keys=True, **ARGS)
        remote = make_loader(remote_set, split, rank=rank, world_size=2, return_keys=True, cache_dir=cache, **ARGS)
        assert len(remote) == len(local) and remote.num_samples == local.num_samples
        assert keys_and_labels(remote) == keys_and_labels(local), (split, rank)
    # the staged part only: rank 1's train part of epoch 0 and the val tars of both ranks
    staged = sorted(p.name for p in (mirror_dir(remote_set, cache) / "train").glob("*.tar"))
    touched = {Path(local.spec.data.tars[i]).name for i, _, _ in local.spec.part_files(0)}
    assert touched <= set(staged) and len(touched) < len(list((demo_shards / "train").glob("*.tar")))


def test_auto_tuning_on_a_remote_set_probes_the_staged_part_and_reads_the_same_epoch(demo_shards, remote_set,
                                                                                   tmp_path):
    cache = tmp_path / "cache"
    local = make_loader(str(demo_shards), "train", rank=1, world_size=2, return_keys=True, **ARGS)
    tuned = make_loader(remote_set, "train", rank=1, world_size=2, return_keys=True, cache_dir=cache,
                        **{**ARGS, "num_threads": "auto"})
    assert tuned.tuning is not None and tuned.tuning["probes"]  # probed on the part staged for it
    staged = {p.name for p in (mirror_dir(remote_set, cache) / "train").glob("*.tar")}
    assert {Path(local.spec.data.tars[i]).name for i, _, _ in local.spec.part_files(0)} <= staged
    # the probe read from the part's start in pipelines of its own: the pass is the untuned one's
    keys, _ = keys_and_labels(tuned)
    assert keys == keys_and_labels(local)[0]  # same seed, same order, whatever the thread count


def test_streaming_through_dalis_s3_reader(demo_shards, remote_set, tmp_path):
    local = make_loader(str(demo_shards), "val", return_keys=True, **ARGS)
    remote = make_loader(remote_set, "val", return_keys=True, cache_dir="none", **ARGS)
    assert all(str(t).startswith("s3://") for t in remote.spec.data.tars)
    assert keys_and_labels(remote) == keys_and_labels(local)
    with pytest.raises(ValueError, match="cache_dir='none' streams through DALI"):
        make_loader(remote_set, "val", backend="torch", cache_dir="none", **ARGS)


def test_next_epochs_part_is_staged_in_the_background(remote_set, tmp_path):
    loader = make_loader(remote_set, "train", rank=0, world_size=2, cache_dir=tmp_path / "c", **ARGS)
    spec = loader.spec
    now = {i for i, _, _ in spec.part_files(0)}
    later = {i for i, _, _ in spec.part_files(1)} - now
    assert later, "the demo's epoch-1 part should touch other tars"
    for _ in loader:
        pass
    for fut in list(spec.data.cache._pending.values()):
        fut.result(timeout=60)
    assert all(Path(spec.data.tars[i]).is_file() for i in later)
    fetched = spec.data.cache.fetched_bytes
    spec.data.cache.fetch([f"train/{Path(spec.data.tars[i]).name}" for i in later])  # epoch 1: nothing new
    assert spec.data.cache.fetched_bytes == fetched


def _read_val(uri: str, cache: str, queue) -> None:
    loader = make_loader(uri, "val", return_keys=True, cache_dir=cache, **ARGS)
    keys, _ = keys_and_labels(loader)
    queue.put((loader.spec.data.cache.fetched_bytes, len(keys)))


def test_two_loaders_on_one_node_share_one_download(demo_shards, remote_set, tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_val, args=(remote_set, str(tmp_path / "shared"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    val_tars = sum(p.stat().st_size for p in (demo_shards / "val").glob("*.tar"))
    val_idx = sum(p.stat().st_size for p in (demo_shards / "val").glob("*.idx"))
    assert [n for _, n in results] == [50, 50]
    # every index and every tar downloaded by exactly one of the two processes
    assert sum(b for b, _ in results) == val_tars + val_idx


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cached_shard_is_fetched_again(demo_shards, remote_set, tmp_path, damage):
    cache = tmp_path / "cache"
    expect = keys_and_labels(make_loader(str(demo_shards), "val", return_keys=True, **ARGS))
    assert keys_and_labels(make_loader(remote_set, "val", return_keys=True, cache_dir=cache, **ARGS)) == expect
    cached = sorted((mirror_dir(remote_set, cache) / "val").glob("*.tar"))[0]
    good = cached.read_bytes()
    if damage == "truncate":
        cached.write_bytes(good[: len(good) // 2])
    else:  # same size, rotten bytes: only the sha256 of shards.parquet can tell
        cached.write_bytes(good[:4096] + bytes(b ^ 0xFF for b in good[4096:8192]) + good[8192:])
    again = make_loader(remote_set, "val", return_keys=True, cache_dir=cache, **ARGS)
    assert keys_and_labels(again) == expect
    assert cached.read_bytes() == good


def test_cache_bound_evicts_least_recently_used(remote_set, demo_shards, tmp_path):
    sizes = {r["shard"]: r["bytes"] for r in pq.read_table(demo_shards / "shards.parquet").to_pylist()
             if r["split"] == "train"}
    cache = tmp_path / "cache"
    args = dict(rank=0, world_size=4, cache_dir=cache, **{**ARGS, "batch_size": 8})
    spec = make_loader(str(demo_shards), "train", **{**args, "cache_dir": None}).spec
    parts = [sum(sizes[Path(spec.data.tars[i]).name] for i, _, _ in spec.part_files(e)) for e in range(3)]
    bound = max(parts) + max(sizes.values())  # one pass and a shard more: far less than the set
    assert bound < sum(sizes.values()) / 2
    loader = make_loader(remote_set, "train", cache_max_gb=bound / 1e9, **args)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        loader.spec.data.cache.wait()  # the next part's prefetch stages (and evicts) in the background
        held = sum(p.stat().st_size for p in (mirror_dir(remote_set, cache) / "train").glob("*.tar"))
        assert held <= bound
    with pytest.raises(StorageError, match=r"cache_max_gb=.*needs .* GB of shards staged at once"):
        make_loader(remote_set, "train", rank=0, world_size=1, cache_dir=cache,
                    cache_max_gb=max(sizes.values()) / 1e9, **ARGS)


def test_bad_remote_locations_fail_in_one_line(remote_set, s3_server, tmp_path):
    cases = [
        (f"{remote_set}/train", "no .tar shards for split 'train'"),
        ("s3://no-such-bucket-here/shards", "bucket 'no-such-bucket-here' does not exist"),
    ]
    for uri, match in cases:
        with pytest.raises((StorageError, FileNotFoundError), match=match) as err:
            make_loader(uri, "train", cache_dir=tmp_path / "c", **ARGS)
        assert "\n" not in str(err.value) and uri in str(err.value)
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:1"
    try:
        with pytest.raises(StorageError, match="cannot reach the storage endpoint") as err:
            make_loader(remote_set, "val", cache_dir=tmp_path / "c", **ARGS)
        assert "\n" not in str(err.value)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint


def test_bench_stages_a_remote_set_into_a_local_mirror(remote_set, demo_shards, monkeypatch, tmp_path):
    """`make bench SHARDS_DIR=s3://...` measures the staged copy (and how fast staging ran)."""
    import pipeline.shardset as shardset
    from bench.loader.staging import stage_remote_set

    monkeypatch.setattr(shardset, "DEFAULT_INDEX_CACHE", tmp_path / "idx")
    monkeypatch.setattr("pipeline.staging.DEFAULT_CACHE_DIR", tmp_path / "cache")
    mirror, figures = stage_remote_set(remote_set, lambda message: None)
    assert mirror == mirror_dir(remote_set, tmp_path / "cache")
    for split in ("train", "val"):
        ours = sorted(p.name for p in (mirror / split).glob("*.tar"))
        assert ours == sorted(p.name for p in (demo_shards / split).glob("*.tar"))
    total = sum(p.stat().st_size for p in demo_shards.glob("*/*.tar"))
    assert figures["staged_bytes"] == total and figures["stage_mb_per_s"] > 0


def test_set_files_are_fetched_once_per_node(demo_shards, remote_set, tmp_path):
    """Issue 23: a node's second make_loader (another rank, val after train, a restart) reads
    the set files from the node's mirror; a set re-packed on the store is fetched again."""
    cache = tmp_path / "cache"
    set_files = sum((demo_shards / f).stat().st_size
                    for f in ("classes.json", "stats.json", "manifest.parquet", "shards.parquet"))
    first = make_loader(remote_set, "train", cache_dir=cache, **ARGS)
    assert first.spec.data.cache.meta_bytes == set_files
    for split in ("val", "train"):
        assert make_loader(remote_set, split, cache_dir=cache, **ARGS).spec.data.cache.meta_bytes == 0
    stats = resolve(f"{remote_set}/stats.json")
    stats.write_bytes(stats.read_bytes() + b"\n")  # a changed file on the store: a new size and time
    again = make_loader(remote_set, "val", cache_dir=cache, **ARGS)
    assert again.spec.data.cache.meta_bytes == (demo_shards / "stats.json").stat().st_size + 1
