"""One input file -> one stored baseline RGB JPEG (or a reject reason); runs in pool workers.

Originals that are already baseline RGB JPEGs needing no resize are copied byte for byte
(after a full decode proves they are intact). Everything else is decoded (JPEG with PIL's
draft mode, which lets libjpeg scale down by 1/2..1/8 while decoding), converted to RGB,
resized so the shorter side is `shorter_side` (never up), and re-encoded.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pixels sampled per train image for stats.json (mean/std/PCA); the sums, not the pixels,
# travel back to the packer, so the cost is independent of the dataset size.
PIXELS_PER_IMAGE = 1024


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    copied: bool
    # sufficient statistics of the sampled pixels in [0, 1]: count, sum[3], outer-product sum[3x3]
    count: int
    sum: tuple[float, ...]
    outer: tuple[float, ...]


def target_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """Size with the shorter side at `shorter_side` (aspect kept); unchanged if already smaller
    or if `shorter_side` is 0."""
    short = min(width, height)
    if shorter_side <= 0 or short <= shorter_side:
        return width, height
    scale = shorter_side / short
    if width <= height:
        return shorter_side, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter_side


def _is_baseline_rgb_jpeg(img: Image.Image) -> bool:
    return img.format == "JPEG" and img.mode == "RGB" and not (
        img.info.get("progressive") or img.info.get("progression")
    )


def _pixel_stats(rgb: np.ndarray, key: str) -> tuple[int, tuple, tuple]:
    flat = rgb.reshape(-1, 3)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    pick = flat[rng.integers(0, len(flat), min(PIXELS_PER_IMAGE, len(flat)))].astype(np.float64) / 255.0
    return len(pick), tuple(pick.sum(0).tolist()), tuple((pick.T @ pick).ravel().tolist())


def encode(path: str, key: str, shorter_side: int, quality: int, want_stats: bool) -> Encoded | str:
    """Encode one file; returns the Encoded sample or a one-line reject reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            copy = _is_baseline_rgb_jpeg(img)
            size = target_size(img.width, img.height, shorter_side)
            resize = size != img.size
            if resize and img.format == "JPEG":
                img.draft("RGB", size)  # decode at the smallest libjpeg scale >= size
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            if resize:
                rgb = rgb.resize(size, Image.BILINEAR)
            if copy and not resize:
                jpeg = data
            else:
                buf = io.BytesIO()
                rgb.save(buf, "JPEG", quality=quality)
                jpeg = buf.getvalue()
            count, s, o = _pixel_stats(np.asarray(rgb), key) if want_stats else (0, (), ())
            width, height = rgb.size
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt image ({e})"
    return Encoded(jpeg, width, height, copy and not resize, count, s, o)


def encode_job(job: tuple[str, str, int, int, bool]) -> tuple[int, Encoded | str]:
    """Pool entry point: (input bytes, result) for (path, key, shorter_side, quality, want_stats)."""
    path, key, shorter_side, quality, want_stats = job
    try:
        in_bytes = Path(path).stat().st_size
    except OSError:
        in_bytes = 0
    return in_bytes, encode(path, key, shorter_side, quality, want_stats)
