"""The DALI loader in CPU mode on real shards: shapes, dtypes, normalisation, labels
against pixels, ten-crop, seeding; and the GPU path against the CPU path where a GPU is."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.shard_writers import COLOURS, write_colour_shards, write_gradient_shards

from pipeline import make_loader
from pipeline.stats import IMAGENET_MEAN, IMAGENET_STD

CROP = 32
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


@pytest.fixture(scope="module")
def colour(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Foreign shards (ShardWriter, no index/manifest/stats): 64 train, 23 val in 3 tars."""
    root = tmp_path_factory.mktemp("colour")
    labels = write_colour_shards(root, "train", 64, per_shard=24)
    labels.update(write_colour_shards(root, "val", 23, per_shard=9, seed=1))
    return root, labels


def loader(root, split, tmp_path, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("device", "cpu")
    return make_loader(root, split, crop_size=CROP, num_threads=2, index_cache_dir=tmp_path / "idx", **kw)


def nearest_colour(images: torch.Tensor) -> list[int]:
    pixels = (images.float() * STD + MEAN).mean(dim=(-2, -1))
    return torch.cdist(pixels, torch.tensor(COLOURS, dtype=torch.float32)).argmin(-1).tolist()


def test_val_batches_are_normalised_and_labels_match_pixels(colour, tmp_path):
    root, truth = colour
    seen = 0
    for images, labels, keys in loader(root, "val", tmp_path, return_keys=True):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, CROP, CROP)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert labels.tolist() == nearest_colour(images) == [truth[k] for k in keys]
        seen += len(keys)
    assert seen == 23
    assert not list((root / "val").glob("*.idx")), "indexes must go to the cache, not the shard dir"


@pytest.mark.parametrize("crop,dtype", [("rrc", "bfloat16"), ("paper", "float16")])
def test_train_batches_shapes_dtypes_and_labels(colour, tmp_path, crop, dtype):
    root, truth = colour
    train = loader(root, "train", tmp_path, crop=crop, dtype=dtype, lighting=False, return_keys=True)
    assert len(train) == 8 and train.num_samples == 64
    batches = list(train)
    assert len(batches) == 8
    for images, labels, keys in batches:
        assert images.shape == (8, 3, CROP, CROP) and images.dtype == getattr(torch, dtype)
        assert labels.tolist() == nearest_colour(images) == [truth[k] for k in keys]
    keys = [k for _, _, ks in batches for k in ks]
    assert sorted(keys) == sorted(k for k in truth if k.startswith("train"))
    assert keys != sorted(keys), "train must be shuffled"


def test_same_seed_same_batches_and_epochs_reshuffle(colour, tmp_path):
    root, _ = colour

    def epoch_of(train):
        return [(images, keys) for images, _, keys in train]

    a = loader(root, "train", tmp_path, seed=7, return_keys=True)
    b = loader(root, "train", tmp_path, seed=7, return_keys=True)
    first, again = epoch_of(a), epoch_of(b)
    assert [k for _, k in first] == [k for _, k in again]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again))
    second = epoch_of(a)  # the next pass is epoch 1
    assert [k for _, k in second] != [k for _, k in first]
    a.set_epoch(0)
    assert [k for _, k in epoch_of(a)] == [k for _, k in first]
    other = loader(root, "train", tmp_path, seed=8, return_keys=True)
    assert [k for _, k in epoch_of(other)] != [k for _, k in first]


def test_ten_crop_views(tmp_path):
    write_gradient_shards(tmp_path, "val", 5, h=48, w=72)
    ten = list(loader(tmp_path, "val", tmp_path, ten_crop=True, batch_size=5))
    centre = list(loader(tmp_path, "val", tmp_path, batch_size=5))
    (images, labels), ((single, _),) = ten[0], centre
    assert images.shape == (5, 10, 3, CROP, CROP) and labels.shape == (5,)
    assert torch.equal(images[:, 5:], images[:, :5].flip(-1)), "views 5-9 mirror views 0-4"
    # view 4 is the centre crop (within a pixel: the square's rounding may shift it by one)
    assert (images[:, 4] - single).abs().mean() < 0.12
    red, green = images[0, :5, 0].mean(-2), images[0, :5, 1].mean(-1)  # x and y profiles
    assert red[0, 0] < red[1, 0] and red[2, 0] < red[3, 0], "left corners left of right ones"
    assert green[0, 0] < green[2, 0] and green[1, 0] < green[3, 0], "top corners above bottom ones"


@pytest.mark.gpu
def test_gpu_path_matches_cpu_on_val(colour, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    root, _ = colour
    cpu = list(loader(root, "val", tmp_path, return_keys=True))
    gpu = list(loader(root, "val", tmp_path, return_keys=True, device="cuda"))
    assert [k for _, _, k in gpu] == [k for _, _, k in cpu]
    for (gi, gl, _), (ci, cl, _) in zip(gpu, cpu):
        assert gi.is_cuda and gl.is_cuda
        assert torch.equal(gl.cpu(), cl)
        assert (gi.cpu() - ci).abs().mean() < 0.05  # nvJPEG and libjpeg-turbo differ slightly


def test_leaving_a_pass_early_leaves_nothing_behind(colour, tmp_path):
    root, _ = colour
    val = loader(root, "val", tmp_path, return_keys=True)
    full = [k for _, _, ks in val for k in ks]
    for _ in val:
        break  # e.g. a max-steps limit
    assert [k for _, _, ks in val for k in ks] == full, "the next pass starts at the first sample"
