"""The DALI loader in CPU mode on real shards: shapes, normalisation, labels, rank splits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import make_loader
from pipeline.stats import IMAGENET_MEAN, IMAGENET_STD
from pipeline_shards import COLOURS, write_colour_shards

CROP = 32


@pytest.fixture(scope="module")
def colour(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Foreign shards (ShardWriter, no index/manifest/stats): 64 train, 23 val in 3 tars."""
    root = tmp_path_factory.mktemp("colour")
    labels = write_colour_shards(root, "train", 64, per_shard=24)
    labels.update(write_colour_shards(root, "val", 23, per_shard=9, seed=1))
    return root, labels


def loader(root, split, tmp_path, **kw):
    kw.setdefault("batch_size", 8)
    return make_loader(root, split, device="cpu", crop_size=CROP, num_threads=2,
                       index_cache_dir=tmp_path / "idx", **kw)


def test_val_batches_are_normalised_and_labels_match_pixels(colour, tmp_path):
    root, truth = colour
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    seen = 0
    for images, labels, keys in loader(root, "val", tmp_path, return_keys=True):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, CROP, CROP)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        pixels = (images * std + mean).mean(dim=(2, 3))  # flat colour per image
        nearest = torch.cdist(pixels, torch.tensor(COLOURS, dtype=torch.float32)).argmin(1)
        assert labels.tolist() == nearest.tolist() == [truth[k] for k in keys]
        seen += len(keys)
    assert seen == 23
    assert not list((root / "val").glob("*.idx")), "indexes must go to the cache, not the shard dir"
