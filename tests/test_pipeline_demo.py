"""The loaders on shards from the real packer (`demo_shards`: index, manifest and stats
present): exact-once val against the manifest for both backends, normalisation with the
shard set's stats.json, the stored-size check."""
from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import make_loader
from pipeline.stats import IMAGENET_STATS, read_stats

CROP = 56


@pytest.fixture(scope="module")
def manifest(demo_shards) -> dict[str, dict[str, int]]:
    rows = pq.read_table(demo_shards / "manifest.parquet", columns=["key", "split", "label"]).to_pylist()
    out: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for row in rows:
        out[row["split"]][row["key"]] = row["label"]
    return out


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_val_exactly_once_on_three_ranks_against_the_manifest(demo_shards, manifest, backend):
    assert len(manifest["val"]) % 3, "the demo's val count should not divide evenly"
    seen, images = Counter(), []
    for rank in range(3):
        loader = make_loader(demo_shards, "val", batch_size=8, rank=rank, world_size=3, device="cpu",
                             backend=backend, crop_size=CROP, return_keys=True, num_threads=2)
        for x, labels, keys in loader:
            assert labels.tolist() == [manifest["val"][k] for k in keys]
            seen.update(keys)
            images.append(x)
    assert seen == Counter(list(manifest["val"]))
    # normalised with the shards' own stats (not ImageNet's): near zero mean, unit spread
    assert read_stats(demo_shards) != IMAGENET_STATS
    pixels = torch.cat(images).transpose(0, 1).reshape(3, -1)
    assert pixels.mean(1).abs().max() < 0.35 and ((pixels.std(1) > 0.6) & (pixels.std(1) < 1.5)).all()


def test_train_on_two_ranks(demo_shards, manifest):
    steps = []
    for rank in range(2):
        loader = make_loader(demo_shards, "train", batch_size=16, rank=rank, world_size=2,
                             device="cpu", crop_size=CROP, crop="paper", return_keys=True, num_threads=2)
        batches = list(loader)
        steps.append(len(batches))
        for x, labels, keys in batches:
            assert x.shape == (16, 3, CROP, CROP)
            assert labels.tolist() == [manifest["train"][k] for k in keys]
    assert steps == [len(manifest["train"]) // 2 // 16] * 2


def test_crop_larger_than_stored_demo_images(demo_shards):
    with pytest.raises(ValueError, match="shorter side 64"):
        make_loader(demo_shards, "val", batch_size=8, device="cpu", crop_size=65)
