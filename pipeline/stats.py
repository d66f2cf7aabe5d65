"""The normalisation and PCA-lighting statistics of a shard set (`stats.json`), and its classes.

All figures are for RGB pixels scaled to [0, 1]. `eigvec` is the 3x3 matrix whose COLUMNS
are the eigenvectors (eigvec[i][j] = channel i of eigenvector j), as numpy's `eigh` returns
it and as AlexNet re-implementations write it; the lighting offset of one image is
`eigvec @ (alpha * eigval)` with alpha ~ N(0, 0.1) drawn per image.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shards.layouts import STATS_FILE

log = logging.getLogger(__name__)

# ImageNet's usual values, used when a shard set carries no stats.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
LIGHTING_STD = 0.1  # the paper's sigma for the per-image alphas


@dataclass(frozen=True)
class Stats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]

    def lighting_matrix(self, scale: float = 255.0) -> list[float]:
        """Row-major 3x3 M with offset = M @ alpha: eigvec * eigval per column, times `scale`."""
        return [scale * self.eigvec[i][j] * self.eigval[j] for i in range(3) for j in range(3)]


IMAGENET_STATS = Stats(IMAGENET_MEAN, IMAGENET_STD, IMAGENET_EIGVAL, IMAGENET_EIGVEC)


def read_stats(shards_dir: str | os.PathLike) -> Stats:
    """`stats.json` of the shard set, or ImageNet's values (with a one-line notice) without one."""
    path = Path(shards_dir) / STATS_FILE
    if not path.is_file():
        _notice_defaults(str(path))
        return IMAGENET_STATS
    try:
        raw = json.loads(path.read_text())
        stats = Stats(
            mean=_vec(raw["mean"]),
            std=_vec(raw["std"]),
            eigval=_vec(raw["eigval"]),
            eigvec=tuple(_vec(row) for row in raw["eigvec"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: expected {{mean, std, eigval: 3 floats, eigvec: 3x3}} ({e}); re-run `python -m shards build`"
        ) from e
    if len(stats.eigvec) != 3 or min(stats.std) <= 0:
        raise ValueError(f"{path}: eigvec must be 3x3 and std positive; re-run `python -m shards build`")
    return stats


@functools.cache
def _notice_defaults(path: str) -> None:
    """Say once per shard set (not once per loader) that ImageNet's values stand in."""
    log.warning("%s not found: normalising with ImageNet's mean/std and PCA eigenpairs", path)


def _vec(values) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values, got {len(out)}")
    return out  # type: ignore[return-value]
