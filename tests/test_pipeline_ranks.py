"""Across ranks: val yields every sample exactly once for any world size (no padding
duplicates, none dropped), train yields the same number of batches on every rank, and the
ranks' parts are disjoint. Both backends, real DALI in CPU mode."""
from __future__ import annotations

from collections import Counter

import pytest
from helpers.shard_writers import write_colour_shards

from pipeline import make_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 train samples in 3 tars; 23 val samples in 3 tars (23 = 8 + 8 + 7)."""
    root = tmp_path_factory.mktemp("ranks")
    labels = write_colour_shards(root, "train", 64, per_shard=24)
    labels.update(write_colour_shards(root, "val", 23, per_shard=8, seed=1))
    return root, labels


def rank_loaders(root, split, world_size, backend, batch_size, tmp_path, **kw):
    return [
        make_loader(root, split, batch_size=batch_size, rank=r, world_size=world_size, device="cpu",
                    backend=backend, crop_size=16, num_threads=2 if backend == "dali" else r % 3,
                    return_keys=True, index_cache_dir=tmp_path / "idx", **kw)
        for r in range(world_size)
    ]


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("world_size,batch_size", [(1, 5), (2, 5), (3, 3)])
def test_val_yields_every_sample_once(shards, tmp_path, backend, world_size, batch_size):
    root, truth = shards
    seen = Counter()
    for loader in rank_loaders(root, "val", world_size, backend, batch_size, tmp_path):
        batches = list(loader)
        assert len(batches) == len(loader), "len() must be the number of batches yielded"
        assert all(0 < len(keys) <= batch_size for _, _, keys in batches)
        assert sum(len(keys) for _, _, keys in batches) == loader.num_samples
        for _, labels, keys in batches:
            assert labels.tolist() == [truth[k] for k in keys]
            seen.update(keys)
    assert seen == Counter(k for k in truth if k.startswith("val")), "each val sample exactly once"


def test_val_with_more_ranks_than_samples(tmp_path):
    write_colour_shards(tmp_path, "val", 2, per_shard=8)
    loaders = rank_loaders(tmp_path, "val", 3, "dali", 4, tmp_path)
    assert [len(x) for x in loaders] == [0, 1, 1]
    assert sum(len(keys) for x in loaders for _, _, keys in x) == 2


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_train_steps_are_equal_on_every_rank(shards, tmp_path, backend):
    # 64 samples on 3 ranks: parts of 21, 21 and 22; batch 11 gives DALI's own iterator
    # 1, 1 and 2 batches (DDP would hang on the third rank): every rank must yield 1.
    root, truth = shards
    loaders = rank_loaders(root, "train", 3, backend, 11, tmp_path)
    keys = []
    for loader in loaders:
        batches = list(loader)
        assert len(loader) == len(batches) == 1 and loader.num_samples == 11
        assert all(len(k) == 11 for _, _, k in batches)
        for _, labels, ks in batches:
            assert labels.tolist() == [truth[k] for k in ks]
            keys += ks
    assert len(keys) == len(set(keys)) == 33, "ranks read disjoint parts"


def test_train_parts_move_between_epochs(shards, tmp_path):
    root, _ = shards
    first = rank_loaders(root, "train", 2, "dali", 8, tmp_path)
    epochs = [[{k for _, _, ks in loader for k in ks} for loader in first] for _ in range(3)]
    for parts in epochs:
        assert not parts[0] & parts[1]
    assert len({frozenset(parts[0]) for parts in epochs}) > 1, "tar order must change per epoch"
