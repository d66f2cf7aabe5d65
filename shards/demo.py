"""The demo dataset: an ImageNet-layout tree (Kaggle release layout) that a CPU learns in minutes.

Each class is a texture that fills the whole image (so any RandomResizedCrop keeps it), drawn
in two random colours with random phase, scale and small rotation, plus noise and distractor
blobs. Colour carries no label, so PCA colour jitter cannot erase the signal. Horizontal
flips map every pattern onto its own class (no mirror pairs).

    train/<wnid>/<wnid>_<n>.JPEG
    val/ILSVRC2012_val_<8 digits>.JPEG   (classes interleaved, as in the real val set)
    LOC_val_solution.csv                 ImageId,PredictionString ("<wnid> x1 y1 x2 y2 ")
    LOC_synset_mapping.txt               <wnid> <names>
"""
from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image

# The ten Imagenette classes with their LOC_synset_mapping.txt names.
IMAGENETTE: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench, Tinca tinca"),
    ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw, chainsaw"),
    ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"),
    ("n03417042", "garbage truck, dustcart"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser"),
    ("n03445777", "golf ball"),
    ("n03888605", "parachute, chute"),
)
PATTERNS = ("hstripes", "vstripes", "checker", "dots", "rings", "zigzag", "crosses", "diamonds", "blobs", "grid")
JPEG_QUALITY = 90


def _pattern(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A [h, w] float mask in [0, 1] for one class's texture."""
    period = rng.uniform(0.07, 0.13) * min(h, w)
    angle = np.deg2rad(rng.uniform(-8, 8))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = x + rng.uniform(0, period)
    y = y + rng.uniform(0, period)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period  # rotated coordinates, in periods
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period
    fu, fv = u - np.floor(u), v - np.floor(v)  # position within a cell, [0, 1)
    if kind == "hstripes":
        m = fv < 0.5
    elif kind == "vstripes":
        m = fu < 0.5
    elif kind == "checker":
        m = (np.floor(u) + np.floor(v)) % 2 == 0
    elif kind == "dots":
        m = (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09
    elif kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / (period * 0.8)
        m = (r - np.floor(r)) < 0.5
    elif kind == "zigzag":
        tri = np.abs(fu - 0.5) * 2  # triangle wave along u
        z = v + tri * 0.6
        m = (z - np.floor(z)) < 0.4
    elif kind == "crosses":
        m = ((np.abs(fu - 0.5) < 0.1) & (np.abs(fv - 0.5) < 0.35)) | (
            (np.abs(fv - 0.5) < 0.1) & (np.abs(fu - 0.5) < 0.35)
        )
    elif kind == "diamonds":
        m = (np.abs(fu - 0.5) + np.abs(fv - 0.5)) < 0.5  # a checkerboard turned 45 degrees
    elif kind == "blobs":
        small = rng.standard_normal((max(2, int(h / period * 1.5)), max(2, int(w / period * 1.5))))
        big = np.asarray(Image.fromarray(small.astype(np.float32)).resize((w, h), Image.BICUBIC))
        m = big > 0
    elif kind == "grid":
        m = (fu < 0.12) | (fv < 0.12)
    else:
        raise ValueError(f"unknown demo pattern {kind!r}")
    return m.astype(np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose brightness differs enough to keep the texture visible."""
    while True:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(a.mean() - b.mean()) > 60:
            return a, b


def render(class_index: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One demo image of class `class_index` as uint8 [height, width, 3]."""
    mask = _pattern(PATTERNS[class_index], height, width, rng)[..., None]
    fg, bg = (c.astype(np.float32) for c in _colours(rng))
    img = bg + (fg - bg) * mask
    for _ in range(rng.integers(1, 5)):  # distractor blobs of random colour
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.04, 0.12) * height, rng.uniform(0.04, 0.12) * width
        y0, y1 = max(0, int(cy - ry)), min(height, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
        y, x = np.ogrid[y0:y1, x0:x1]
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        img[y0:y1, x0:x1][inside] = rng.uniform(0, 255, 3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(5, 20))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(args: tuple) -> tuple[str, int, int]:
    path, class_index, seed_seq, min_side, max_side = args
    rng = np.random.default_rng(seed_seq)
    w, h = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
    buf = io.BytesIO()
    Image.fromarray(render(class_index, w, h, rng)).save(buf, "JPEG", quality=JPEG_QUALITY)
    Path(path).write_bytes(buf.getvalue())
    return path, w, h


def write_demo(
    out: Path,
    classes: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    seed: int = 0,
    min_side: int = 300,
    max_side: int = 600,
    workers: int | None = None,
) -> Path:
    """Write the demo tree under `out` (deterministic for `seed`) and return `out`."""
    if not 1 <= classes <= len(IMAGENETTE):
        raise ValueError(f"--classes must be between 1 and {len(IMAGENETTE)}, got {classes}")
    if train_per_class < 0 or val_per_class < 0:
        raise ValueError("--train-per-class and --val-per-class must be >= 0")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    wnids = [w for w, _ in IMAGENETTE[:classes]]
    jobs = []
    for c, wnid in enumerate(wnids):
        (out / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for n in range(train_per_class):
            path = out / "train" / wnid / f"{wnid}_{n + 1}.JPEG"
            jobs.append((str(path), c, [seed, 0, c, n], min_side, max_side))
    (out / "val").mkdir(parents=True, exist_ok=True)
    val_classes = np.repeat(np.arange(classes), val_per_class)
    np.random.default_rng([seed, 1]).shuffle(val_classes)
    val_jobs = []
    for i, c in enumerate(val_classes.tolist()):
        path = out / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        val_jobs.append((str(path), c, [seed, 1, c, i], min_side, max_side))
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) + len(val_jobs) > 50:
        with mp.get_context("spawn").Pool(workers) as pool:
            done = pool.map(_jpeg, jobs + val_jobs, chunksize=16)
    else:
        done = [_jpeg(j) for j in jobs + val_jobs]
    val_sizes = done[len(jobs):]
    rng = np.random.default_rng([seed, 2])
    with open(out / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for (path, w, h), c in zip(val_sizes, val_classes.tolist()):
            x1, y1 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
            x2, y2 = int(rng.integers(2 * w // 3, w)), int(rng.integers(2 * h // 3, h))
            writer.writerow([Path(path).stem, f"{wnids[c]} {x1} {y1} {x2} {y2} "])
    with open(out / "LOC_synset_mapping.txt", "w") as f:
        for wnid, names in IMAGENETTE[:classes]:
            f.write(f"{wnid} {names}\n")
    return out
