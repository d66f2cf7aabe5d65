"""Train augmentation read back off the pixels: the crop window and flip of every output
(gradient images: red encodes x, green y) and the PCA lighting offsets (flat grey images),
for both backends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.shard_writers import write_flat_shards, write_gradient_shards

from pipeline import make_loader
from pipeline.stats import IMAGENET_MEAN, IMAGENET_STD

H, W = 64, 96  # the gradient images
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """Half the images stored at 64x96, half at 32x48: with crop 28 (cut from 32) the DALI
    CPU graph resizes the first and ROI-decodes the second, in the same batches."""
    root = tmp_path_factory.mktemp("gradient")
    shapes = write_gradient_shards(root, "train", 256, H, W, also=(H // 2, W // 2))
    return root, shapes


def windows(gradients, backend, crop, crop_size, tmp_path):
    """Per output image: (x0, x1, y0, y1) of its window in units of the 64x96 source, and
    whether it is mirrored."""
    root, shapes = gradients
    loader = make_loader(root, "train", batch_size=64, device="cpu", backend=backend, crop=crop,
                         crop_size=crop_size, lighting=False, num_threads=2, return_keys=True,
                         index_cache_dir=tmp_path / "idx")
    batches = list(loader)
    images = torch.cat([x for x, _, _ in batches]).float() * STD + MEAN
    h, w = torch.tensor([shapes[k] for _, _, keys in batches for k in keys], dtype=torch.float32).T
    red, green = images[:, 0].mean(1), images[:, 1].mean(2)  # x profile (per column), y profile
    left, right = red[:, 0], red[:, -1]
    flipped = left > right
    # the first and last columns sample the window half an output pixel in from its edges
    inner = crop_size / (crop_size - 1)
    width = (left - right).abs() / 255 * (w - 1) * inner
    height = (green[:, -1] - green[:, 0]) / 255 * (h - 1) * inner
    x0 = torch.minimum(left, right) / 255 * (w - 1) - width / crop_size / 2
    y0 = green[:, 0] / 255 * (h - 1) - height / crop_size / 2
    scale = H / h  # to 64x96 units
    return x0 * scale, (x0 + width) * scale, y0 * scale, (y0 + height) * scale, flipped


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_random_resized_crop_area_aspect_and_flip_rate(gradients, tmp_path, backend):
    x0, x1, y0, y1, flipped = windows(gradients, backend, "rrc", 24, tmp_path)
    assert len(flipped) == 256
    area = (x1 - x0) * (y1 - y0) / (H * W)
    aspect = (x1 - x0) / (y1 - y0)
    assert area.min() > 0.08 * 0.8 and area.max() < 1.05, (area.min(), area.max())
    assert area.min() < 0.2 and area.max() > 0.8, "areas must spread over 8%-100%"
    assert aspect.min() > 0.75 * 0.85 and aspect.max() < 4 / 3 * 1.15, (aspect.min(), aspect.max())
    assert x0.min() > -1.5 and x1.max() < W + 1.5 and y0.min() > -1.5 and y1.max() < H + 1.5
    assert 0.4 < flipped.float().mean() < 0.6, "horizontal flip with p=0.5"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_paper_crop_is_a_random_patch_of_the_central_square(gradients, tmp_path, backend):
    # crop 28 of base 32: the 64x96 source is resized to 32x48, its central 32x32 square
    # spans source x 16..80, and every 28-px patch of it spans 56 source pixels (the 32x48
    # images are stored at base already: the same in 64x96 units).
    x0, x1, y0, y1, flipped = windows(gradients, backend, "paper", 28, tmp_path)
    assert ((x1 - x0) - 56).abs().max() < 2.5 and ((y1 - y0) - 56).abs().max() < 2.5
    assert x0.min() > 16 - 1.5 and x1.max() < 80 + 1.5 and y0.min() > -1.5 and y1.max() < 64 + 1.5
    assert x0.max() - x0.min() > 5 and y0.max() - y0.min() > 5, "patch positions must vary"
    assert 0.4 < flipped.float().mean() < 0.6


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_lighting_offsets_have_the_pca_covariance(tmp_path, backend):
    """Over many flat grey images, the per-image RGB offsets have covariance
    eigvec diag((0.1 eigval)^2) eigvec^T: along each eigenvector they are independent
    with std 0.1 * eigval."""
    write_flat_shards(tmp_path, "train", 512, level=128)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))  # a rotation, not symmetric
    eigval = np.array([0.3, 0.1, 0.03])
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3, "eigval": eigval.tolist(), "eigvec": q.tolist()}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    loader = make_loader(tmp_path, "train", batch_size=128, device="cpu", backend=backend,
                         crop_size=16, num_threads=2, index_cache_dir=tmp_path / "idx")
    images = torch.cat([x for x, _ in loader]).double()
    offsets = (images * 0.25 * 255 + 0.5 * 255 - 128).mean(dim=(2, 3)).numpy() / 255  # [N, 3]
    assert offsets.shape == (512, 3)
    along = offsets @ q  # components along the eigenvectors (the columns of eigvec)
    std = along.std(axis=0)
    assert np.allclose(std, 0.1 * eigval, rtol=0.12), (std, 0.1 * eigval)
    assert np.all(np.abs(along.mean(axis=0)) < 4 * 0.1 * eigval / np.sqrt(512))
    corr = np.corrcoef(along.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.15), corr
    expected = q @ np.diag((0.1 * eigval) ** 2) @ q.T
    assert np.allclose(np.cov(offsets.T), expected, atol=0.15 * (0.1 * eigval[0]) ** 2)
