"""The DALI graphs' chains in PIL + numpy, for the torch baseline (torchvision does not
import beside our torch, so this is written here). One small class per split, whose
`__call__` states the whole chain, as in torchvision's classification presets.

Every chain takes a decoded RGB PIL image and a numpy Generator, and returns float32 CHW
(ten-crop: [10, 3, crop, crop]) normalised with the stats, like the DALI graphs.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pipeline.stats import LIGHTING_STD, Stats

RRC_RATIO = (3 / 4, 4 / 3)


class Normalise:
    """(x + lighting offset - mean) / std on 0..255 pixels, HWC uint8 -> CHW float32."""

    def __init__(self, stats: Stats, lighting: bool) -> None:
        self.mean = np.array(stats.mean, np.float32) * 255
        self.std = np.array(stats.std, np.float32) * 255
        self.lighting = np.array(stats.lighting_matrix(), np.float32).reshape(3, 3) if lighting else None

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mean = self.mean
        if self.lighting is not None:  # one offset per image: M @ alpha, alpha ~ N(0, 0.1)
            mean = mean - self.lighting @ rng.normal(0.0, LIGHTING_STD, 3).astype(np.float32)
        out = (pixels.astype(np.float32) - mean) / self.std
        return np.ascontiguousarray(out.transpose(2, 0, 1))


class TrainRRC:
    """RandomResizedCrop to crop_size -> flip p=0.5 -> PCA lighting -> normalise."""

    def __init__(self, crop_size: int, scale: tuple[float, float], stats: Stats, lighting: bool) -> None:
        self.size, self.scale = crop_size, scale
        self.normalise = Normalise(stats, lighting)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        box = rrc_box(img.width, img.height, self.scale, rng)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        return self.normalise(_flip(np.asarray(img), rng), rng)


class TrainPaper:
    """Shorter side to base -> central base square -> random crop_size patch -> flip ->
    PCA lighting -> normalise."""

    def __init__(self, crop_size: int, base: int, stats: Stats, lighting: bool) -> None:
        self.size, self.base = crop_size, base
        self.normalise = Normalise(stats, lighting)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        square = np.asarray(centre_crop(resize_shorter(img, self.base), self.base))
        y, x = (int(rng.integers(0, self.base - self.size + 1)) for _ in range(2))
        patch = square[y : y + self.size, x : x + self.size]
        return self.normalise(_flip(patch, rng), rng)


class Val:
    """Shorter side to base -> centre crop_size -> normalise."""

    def __init__(self, crop_size: int, base: int, stats: Stats) -> None:
        self.size, self.base = crop_size, base
        self.normalise = Normalise(stats, lighting=False)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        return self.normalise(np.asarray(centre_crop(resize_shorter(img, self.base), self.size)), rng)


class TenCrop:
    """Shorter side to base -> central base square -> four corners + centre, then mirrored."""

    def __init__(self, crop_size: int, base: int, stats: Stats) -> None:
        self.size, self.base = crop_size, base
        self.normalise = Normalise(stats, lighting=False)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        square = np.asarray(centre_crop(resize_shorter(img, self.base), self.base))
        far, mid = self.base - self.size, (self.base - self.size + 1) // 2
        corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]  # (y, x): TL TR BL BR C
        views = [square[y : y + self.size, x : x + self.size] for y, x in corners]
        views += [v[:, ::-1] for v in views]
        return np.stack([self.normalise(v, rng) for v in views])


def rrc_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator):
    """RandomResizedCrop's window (left, top, right, bottom): area in `scale` of the image,
    aspect ratio log-uniform in 3/4..4/3; ten tries, then the centre crop closest in ratio."""
    area = width * height
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = min(max(width / height, RRC_RATIO[0]), RRC_RATIO[1])
    w, h = (width, round(width / ratio)) if width / height <= ratio else (round(height * ratio), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    size = (side, max(1, round(h * side / w))) if w <= h else (max(1, round(w * side / h)), side)
    return img.resize(size, Image.BILINEAR)


def centre_crop(img: Image.Image, side: int) -> Image.Image:
    left, top = (img.width - side + 1) // 2, (img.height - side + 1) // 2
    return img.crop((left, top, left + side, top + side))


def _flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels
