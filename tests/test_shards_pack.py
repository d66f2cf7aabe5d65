"""The packer on the shared demo shards: counts, labels, readers, indices, stats."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from shards.index import index_bytes
from shards.layouts import CLASSES_FILE, MANIFEST_FILE, REJECTS_FILE, SHARDS_FILE, STATS_FILE, split_tars

WDS2IDX = Path(sys.executable).parent / "wds2idx"


def test_every_input_packed_once_with_its_class(demo_tree: Path, demo_shards: Path) -> None:
    manifest = pq.read_table(demo_shards / MANIFEST_FILE).to_pylist()
    assert pq.read_table(demo_shards / REJECTS_FILE).num_rows == 0
    train = [r for r in manifest if r["split"] == "train"]
    val = [r for r in manifest if r["split"] == "val"]
    assert (len(train), len(val)) == (240, 50)
    classes = json.loads((demo_shards / CLASSES_FILE).read_text())
    assert [c["wnid"] for c in classes] == sorted(c["wnid"] for c in classes)
    assert classes[0] == {"index": 0, "wnid": "n01440764", "name": "tench"}
    wnid_of = {c["index"]: c["wnid"] for c in classes}
    for r in train:  # train/<wnid>/<wnid>_<n>.JPEG: the folder is the truth
        assert r["wnid"] == Path(r["source"]).parent.name == wnid_of[r["label"]]
    solution = dict(line.split(",", 1) for line in (demo_tree / "LOC_val_solution.csv").read_text().splitlines()[1:])
    for r in val:
        assert solution[r["key"]].split()[0] == r["wnid"] == wnid_of[r["label"]]
    assert sorted(r["key"] for r in val) == [r["key"] for r in val]  # val keeps sorted order
    assert min(min(r["width"], r["height"]) for r in manifest) == 64


def test_train_order_mixes_classes_in_every_shard(demo_shards: Path) -> None:
    manifest = pq.read_table(demo_shards / MANIFEST_FILE).to_pylist()
    first = [r["label"] for r in manifest if r["split"] == "train" and r["shard"] == "shard-000000.tar"]
    assert len(set(first)) >= 3, first


def test_webdataset_reads_every_sample_back(demo_shards: Path) -> None:
    manifest = {(r["split"], r["key"]): r for r in pq.read_table(demo_shards / MANIFEST_FILE).to_pylist()}
    seen = set()
    for split in ("train", "val"):
        tars = split_tars(demo_shards, split)
        assert len(tars) >= 3
        for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil"):
            row = manifest[(split, sample["__key__"])]
            assert int(sample["cls"]) == row["label"]
            assert sample["jpg"].size == (row["width"], row["height"]) and sample["jpg"].mode == "RGB"
            seen.add((split, sample["__key__"]))
    assert seen == set(manifest)


def test_each_index_equals_wds2idx(demo_shards: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        for tar in split_tars(demo_shards, split):
            ref = tmp_path / "ref.idx"
            subprocess.run([str(WDS2IDX), str(tar), str(ref)], check=True, capture_output=True)
            assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes() == index_bytes(tar), tar


def test_stats_are_sane(demo_shards: Path) -> None:
    stats = json.loads((demo_shards / STATS_FILE).read_text())
    assert set(stats) == {"mean", "std", "eigval", "eigvec"}
    mean, std, eigval, eigvec = (np.array(stats[k]) for k in ("mean", "std", "eigval", "eigvec"))
    assert mean.shape == std.shape == eigval.shape == (3,) and eigvec.shape == (3, 3)
    assert np.all((mean > 0.2) & (mean < 0.8)) and np.all((std > 0.1) & (std < 0.5))
    assert np.all(np.diff(eigval) <= 0) and eigval[-1] > 0
    assert np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-6)  # orthonormal columns
    # eigenvalues of the covariance sum to the total variance
    assert eigval.sum() == pytest.approx((std ** 2).sum(), rel=1e-6)


def test_shards_parquet_lists_every_tar_with_its_size_hash_and_count(demo_shards: Path) -> None:
    table = pq.read_table(demo_shards / SHARDS_FILE)
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("split", "string"), ("shard", "string"), ("bytes", "int64"), ("samples", "int64"), ("sha256", "string")]
    rows = table.to_pylist()
    tars = [(split, t) for split in ("train", "val") for t in split_tars(demo_shards, split)]
    assert [(r["split"], r["shard"]) for r in rows] == [(split, t.name) for split, t in tars]
    per_shard: dict[tuple[str, str], int] = {}
    for m in pq.read_table(demo_shards / MANIFEST_FILE).to_pylist():
        per_shard[(m["split"], m["shard"])] = per_shard.get((m["split"], m["shard"]), 0) + 1
    for r, (split, tar) in zip(rows, tars):
        data = tar.read_bytes()
        assert r["bytes"] == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest(), tar
        assert r["samples"] == per_shard[(split, tar.name)]
