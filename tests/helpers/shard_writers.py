"""Shard sets for the pipeline tests, written with webdataset's ShardWriter (a foreign
writer: no .idx, manifest or stats), whose pixels reveal what the pipeline did.

- `write_colour_shards`: class k is a flat colour, so labels can be checked on pixels.
- `write_gradient_shards`: red encodes x and green y of the source pixel, so the crop
  window and the flip of every output can be read back off its pixels.
- `write_flat_shards`: one grey level everywhere, so what the lighting adds is plain.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

COLOURS = np.array([(220, 30, 30), (30, 200, 40), (40, 50, 210), (200, 200, 200), (20, 20, 20)])


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _write(out: Path, samples, per_shard: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    with wds.ShardWriter(str(out / "part-%03d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, pixels, label in samples:
            sink.write({"__key__": key, "jpg": _jpeg(pixels), "cls": str(label).encode()})
            keys.append(key)
    return keys


def write_colour_shards(root: Path, split: str, n: int, per_shard: int, seed: int = 0) -> dict[str, int]:
    """`n` samples of class i % 5 in flat COLOURS[i % 5], sizes 40-90 px; returns key -> label."""
    rng = np.random.default_rng(seed)
    labels = {}

    def samples():
        for i in range(n):
            label = i % len(COLOURS)
            h, w = (int(v) for v in rng.integers(40, 90, size=2))
            key = f"{split}_{i:05d}"
            labels[key] = label
            yield key, np.broadcast_to(COLOURS[label].astype(np.uint8), (h, w, 3)).copy(), label

    _write(root / split, samples(), per_shard)
    return labels


def gradient(h: int, w: int) -> np.ndarray:
    """Red = x / (w - 1) * 255, green = y / (h - 1) * 255, blue 128."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full((h, w), 128.0)], -1).round().astype(np.uint8)


def write_gradient_shards(root: Path, split: str, n: int, h: int, w: int, per_shard: int = 64,
                          also: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
    """`n` gradient images of h x w (every other one `also` = (h, w) when given); key -> (h, w)."""
    sizes = [(h, w), also] if also else [(h, w)]
    shape = {f"g{i:05d}": sizes[i % len(sizes)] for i in range(n)}
    _write(root / split, ((key, gradient(*hw), 0) for key, hw in shape.items()), per_shard)
    return shape


def write_flat_shards(root: Path, split: str, n: int, level: int = 128, side: int = 32) -> None:
    flat = np.full((side, side, 3), level, np.uint8)
    _write(root / split, ((f"f{i:05d}", flat, 0) for i in range(n)), 128)
