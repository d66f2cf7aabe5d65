"""Shards whose bytes rot after packing (`on_corrupt`): a corrupt image never hangs or
crashes a loader; "error" stops with one line naming the shard file and the sample key,
"skip" leaves the sample out, keeps the step count and counts it. Real DALI (CPU) and the
torch baseline on a copy of the demo shards with one image damaged in place."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from pipeline import make_loader
from pipeline.corrupt import CorruptSample, index_samples
from pipeline.integrity import HASHED_BYTES, Hasher, stamped

ARGS = dict(batch_size=8, device="cpu", crop_size=56, num_threads=1, return_keys=True)


def damage(shards: Path, split: str, how: str) -> tuple[Path, str]:
    """Damage one image in the middle of the split's second tar; returns (tar, key)."""
    tar = sorted((shards / split).glob("*.tar"))[1]
    refs = index_samples(tar.with_suffix(".idx"), str(tar))
    ref = refs[len(refs) // 2]
    with open(tar, "r+b") as f:
        if how == "flip":  # bytes flipped in the JPEG header
            f.seek(ref.offset + 2)
            head = f.read(200)
            f.seek(ref.offset + 2)
            f.write(bytes(b ^ 0xFF for b in head))
        else:  # a zeroed block from the start of the image
            f.seek(ref.offset)
            f.write(bytes(min(4096, ref.size)))
    return tar, ref.key


@pytest.fixture()
def rotten(demo_shards, tmp_path) -> tuple[Path, Path, str]:
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    tar, key = damage(shards, "train", "flip")
    return shards, tar, key


def all_keys(loader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


@pytest.mark.parametrize("backend,how", [("dali", "flip"), ("dali", "zero"), ("torch", "flip")])
def test_error_names_the_shard_and_the_key_in_one_line(demo_shards, tmp_path, backend, how):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    tar, key = damage(shards, "train", how)
    loader = make_loader(str(shards), "train", backend=backend, **ARGS)
    with pytest.raises(CorruptSample) as err:
        all_keys(loader)
    text = str(err.value)
    assert str(tar) in text and repr(key) in text and "python -m shards verify" in text and "\n" not in text


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skip_leaves_the_sample_out_and_keeps_the_step_count(rotten, demo_shards, backend):
    shards, tar, key = rotten
    clean = make_loader(str(demo_shards), "train", backend=backend, rank=0, world_size=2, **ARGS)
    loader = make_loader(str(shards), "train", backend=backend, rank=0, world_size=2, on_corrupt="skip", **ARGS)
    expected = set(all_keys(clean))
    if key not in {r.key for i, a, b in loader.spec.part_files(0)
                   for r in index_samples(loader.spec.data.indexes[i], "", a, b)}:
        loader = make_loader(str(shards), "train", backend=backend, rank=1, world_size=2, on_corrupt="skip", **ARGS)
        clean = make_loader(str(demo_shards), "train", backend=backend, rank=1, world_size=2, **ARGS)
        expected = set(all_keys(clean))
    batches = list(loader)
    keys = [k for _, _, ks in batches for k in ks]
    assert len(batches) == len(loader)  # DDP: every rank takes the same number of steps
    assert key not in keys and len(keys) == len(set(keys))
    assert loader.skipped == [{"shard": str(tar), "key": key, "epoch": 0}]
    if backend == "dali":  # the part's spare samples fill in: the same count, the bad one replaced
        assert len(keys) >= loader.num_samples - 1 and set(keys) <= expected | set(
            r.key for i, a, b in loader.spec.part_files(0)
            for r in index_samples(loader.spec.data.indexes[i], "", a, b))
    else:
        assert set(keys) == expected - {key}


def test_skip_in_val_evaluates_every_other_sample_once(demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    tar, key = damage(shards, "val", "flip")
    keys = []
    for rank in range(3):
        keys += all_keys(make_loader(str(shards), "val", rank=rank, world_size=3, on_corrupt="skip", **ARGS))
    clean = all_keys(make_loader(str(demo_shards), "val", **ARGS))
    assert sorted(keys) == sorted(set(clean) - {key})


def test_resume_after_a_skip_continues_without_repeats(rotten):
    shards, tar, key = rotten
    make = lambda: make_loader(str(shards), "train", on_corrupt="skip", **ARGS)  # noqa: E731
    first = make()
    it = iter(first)
    head = [next(it)[2] for _ in range(3)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = all_keys(resumed)
    keys = [k for ks in head for k in ks] + rest
    assert key not in keys and len(keys) == len(set(keys))
    assert len(head) + len(list(range(3, len(first)))) == len(first)


def test_no_tar_is_hashed_before_the_first_batch_and_each_is_hashed_once_behind(demo_shards, tmp_path):
    """Issue 23: the sha256 of a rank's part is off the path to the first batch. A fresh copy
    (no stamps) reads its first batch with no byte hashed by the loader's thread; the
    background hasher then stamps every tar of the part, and the next loader hashes nothing."""
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    me = threading.current_thread().name
    before = dict(HASHED_BYTES)
    loader = make_loader(str(shards), "train", **ARGS)
    next(iter(loader))
    assert HASHED_BYTES[me] == before.get(me, 0)
    Hasher.shared().wait_idle()
    part = [Path(loader.spec.data.tars[i]) for i, _, _ in loader.spec.part_files(0)]
    recorded = loader.spec.data.recorded
    assert all(stamped(t, recorded[t.name][1]) for t in part)
    assert HASHED_BYTES["tar-hash"] - before.get("tar-hash", 0) >= sum(t.stat().st_size for t in part)
    hashed = HASHED_BYTES["tar-hash"]
    again = make_loader(str(shards), "train", **ARGS)
    next(iter(again))
    Hasher.shared().wait_idle()
    assert HASHED_BYTES["tar-hash"] == hashed and HASHED_BYTES[me] == before.get(me, 0)


def wrong_padding(shards: Path, split: str, keep_mtime: bool) -> Path:
    """A byte changed in the split's second tar where no reader looks (the end-of-archive
    zeros): same size, every image decodes, only the sha256 tells. `keep_mtime`: as rot on
    a disk leaves it (else as a rewrite does: newer than shards.parquet)."""
    tar = sorted((shards / split).glob("*.tar"))[1]
    st = tar.stat()
    with open(tar, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x01")
    if keep_mtime:
        os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    return tar


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["rewritten", "rotted"])
def test_wrong_bytes_whose_images_decode_are_named_when_read(demo_shards, tmp_path, keep_mtime):
    """A tar changed since shards.parquet (newer) is hashed before it is read; one that
    rotted in place (size and mtime kept) is hashed behind the reader and named in the pass
    that finds it, or at the next one's start."""
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    tar = wrong_padding(shards, "val", keep_mtime)
    loader = make_loader(str(shards), "val", **ARGS)
    with pytest.raises(CorruptSample) as err:
        for _ in range(2):
            list(loader)
            Hasher.shared().wait_idle()
    text = str(err.value)
    assert str(tar) in text and "sha256" in text and "python -m shards verify" in text and "\n" not in text
    # "skip": a warning, and every sample is still read (no image is corrupt)
    keys = all_keys(make_loader(str(shards), "val", on_corrupt="skip", **ARGS))
    assert sorted(keys) == sorted(all_keys(make_loader(str(demo_shards), "val", **ARGS)))
