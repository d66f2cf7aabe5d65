"""The benchmark corpus: deterministic ImageNet-like JPEGs, packed by our packer, cached.

Real ImageNet photos cannot ship with the project, so the bench draws its own: the size mix
of ILSVRC-2012 train (most images 500 px on the long side, 500x375 the commonest, a few
small and a few very large ones) and photo-like content (1/f luminance texture over several
octaves, softer colour, hard edges) so that a quality-90 JPEG weighs about 100-150 KB and
costs what a real one costs to decode. The tree is packed twice: shorter side 256 (what
training reads) and at the original size.

Everything is cached under `data/bench/` beside a fingerprint of the generator's settings,
so a second `make bench` reuses it; a different fingerprint rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Bump when the generator's output changes, so old caches are rebuilt.
GENERATOR_VERSION = 1

# (width, height, weight): the shape mix of ILSVRC-2012 train, rounded. "small" and
# "large" rows are resolved per image (a random scale of 500x375 or 375x500). Small ones keep
# a shorter side of at least 256 (ImageNet has a few smaller): the loader refuses shard sets
# whose stored images are smaller than the crop, and the bench crops 224 from the unresized set.
SIZE_MIX = (
    (500, 375, 0.38),
    (375, 500, 0.12),
    (500, 333, 0.14),
    (333, 500, 0.05),
    (500, 500, 0.08),
    (500, 400, 0.05),
    ("small", None, 0.14),
    ("large", None, 0.04),
)


@dataclass(frozen=True)
class CorpusSpec:
    """What the generator draws; its hash names the cache."""

    images: int = 2560
    classes: int = 10
    seed: int = 0
    quality: int = 90
    shard_size_mb: int = 8

    def fingerprint(self) -> str:
        blob = json.dumps({**asdict(self), "v": GENERATOR_VERSION, "mix": SIZE_MIX}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Corpus:
    """The shard sets the bench measures, by name ("256": shorter side 256, "full": original)."""

    root: Path
    shards: dict[str, Path]
    stats: dict


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """One (width, height) drawn from SIZE_MIX."""
    weights = np.array([row[2] for row in SIZE_MIX])
    w, h, _ = SIZE_MIX[rng.choice(len(SIZE_MIX), p=weights / weights.sum())]
    if w in ("small", "large"):
        scale = rng.uniform(0.69, 0.95) if w == "small" else rng.choice([1.6, 2.0, 2.56, 3.2])
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        w, h = int(round(w * scale)), int(round(h * scale))
    return int(w), int(h)


def _upsample(small: np.ndarray, w: int, h: int) -> np.ndarray:
    planes = [Image.fromarray(np.ascontiguousarray(small[..., c])).resize((w, h), Image.BILINEAR)
              for c in range(small.shape[-1])]
    return np.stack([np.asarray(p) for p in planes], axis=-1)


def synth_image(index: int, seed: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """The corpus image number `index`: the same pixels for the same (index, seed, size); its
    (width, height) drawn from SIZE_MIX, or `size` (the packer bench's fixed 500x375). The one
    synthetic-photo generator of the benches."""
    rng = np.random.default_rng([seed, index])
    w, h = size or image_size(rng)
    detail = float(np.exp(rng.normal(np.log(2.5), 0.5)))
    # Octave grids are sized relative to a 768-px reference so that texture scales with the
    # image: a large photo carries finer detail per pixel-of-500, as real large photos do.
    ref = 768 * max(1.0, max(w, h) / 500) ** 0.5
    lum = np.zeros((h, w, 1), np.float32)
    for cells, amp in ((3, 45), (12, 28), (48, 16), (192, 8 * detail), (384, 7 * detail), (768, 9 * detail)):
        gw, gh = max(2, round(w * cells / ref)), max(2, round(h * cells / ref))
        lum += amp * _upsample(rng.standard_normal((gh, gw, 1), dtype=np.float32), w, h)
    chroma = (25 * _upsample(rng.standard_normal((4, 5, 3), dtype=np.float32), w, h)
              + 8 * _upsample(rng.standard_normal((24, 32, 3), dtype=np.float32), w, h))
    pixels = lum + chroma + rng.uniform(70, 170, 3).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # hard edges, as objects give
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, outline=colour, width=int(rng.integers(1, 6)))
    return img


def _wnid(label: int) -> str:
    return f"n{90000000 + label:08d}"


def _write_one(args: tuple[int, int, int, int, str, tuple[int, int] | None]) -> None:
    index, seed, classes, quality, root, size = args
    label = index % classes
    path = Path(root) / "train" / _wnid(label) / f"{_wnid(label)}_{index}.JPEG"
    synth_image(index, seed, size).save(path, "JPEG", quality=quality)


def write_tree(spec: CorpusSpec, out: Path, workers: int | None = None,
               size: tuple[int, int] | None = None) -> Path:
    """Write an ImageNet-layout tree (`train/<wnid>/*.JPEG`) of `spec.images` images (all of
    `size` where given)."""
    out = Path(out)
    for label in range(spec.classes):
        (out / "train" / _wnid(label)).mkdir(parents=True, exist_ok=True)
    (out / "LOC_synset_mapping.txt").write_text(
        "".join(f"{_wnid(k)} bench class {k}\n" for k in range(spec.classes)))
    jobs = [(i, spec.seed, spec.classes, spec.quality, str(out), size) for i in range(spec.images)]
    workers = workers or mp.cpu_count()
    if workers <= 1:
        for job in jobs:
            _write_one(job)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
                pass
    return out


def describe_tree(tree: Path) -> dict:
    """The size mix and file sizes of a tree, to check it looks like ImageNet."""
    files = sorted(Path(tree).rglob("*.JPEG"))
    dims = []
    for f in files:
        with Image.open(f) as im:
            dims.append(im.size)
    nbytes = np.array([f.stat().st_size for f in files], dtype=np.float64)
    return _describe(dims, nbytes)


def describe_shards(shards_dir: Path, split: str = "train") -> dict:
    """The same description, read from the `.jpg` members of a shard set."""
    dims, nbytes = [], []
    for tar_path in sorted((Path(shards_dir) / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    data = tar.extractfile(member)
                    with Image.open(data) as im:
                        dims.append(im.size)
                    nbytes.append(member.size)
    return _describe(dims, np.array(nbytes, dtype=np.float64))


def _describe(dims: list[tuple[int, int]], nbytes: np.ndarray) -> dict:
    if not dims:
        return {"images": 0}
    wh = np.array(dims)
    shapes: dict[str, int] = {}
    for w, h in dims:
        shapes[f"{w}x{h}"] = shapes.get(f"{w}x{h}", 0) + 1
    common = sorted(shapes.items(), key=lambda kv: -kv[1])[:5]
    return {
        "images": len(dims),
        "kb_mean": round(float(nbytes.mean()) / 1e3, 1),
        "kb_p10_p50_p90": [round(float(q) / 1e3, 1) for q in np.percentile(nbytes, [10, 50, 90])],
        "width_mean": round(float(wh[:, 0].mean()), 1),
        "height_mean": round(float(wh[:, 1].mean()), 1),
        "megapixels_mean": round(float((wh[:, 0] * wh[:, 1]).mean()) / 1e6, 3),
        "long_side_500_share": round(float((wh.max(axis=1) == 500).mean()), 3),
        "common_sizes": {k: round(v / len(dims), 3) for k, v in common},
    }


def ensure_corpus(root: Path, spec: CorpusSpec = CorpusSpec(), workers: int | None = None,
                  progress=print) -> Corpus:
    """The cached corpus under `root` (normally `data/bench/`): reused when its fingerprint
    matches, otherwise generated and packed (shorter side 256, and original size)."""
    from shards.pack import build  # the bench measures shards exactly as the packer writes them

    root = Path(root)
    done = root / "corpus.json"
    shards = {"256": root / "shards-256", "full": root / "shards-full"}
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("fingerprint") == spec.fingerprint() and all(p.is_dir() for p in shards.values()):
            progress(f"corpus: reusing {root} (fingerprint {spec.fingerprint()})")
            return Corpus(root, shards, meta["stats"])
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tree = root / "source"
    progress(f"corpus: drawing {spec.images} ImageNet-like JPEGs into {tree} (once; cached)")
    write_tree(spec, tree, workers)
    for name, side in (("256", 256), ("full", 0)):
        progress(f"corpus: packing {name} (shorter side {side or 'unchanged'}) into {shards[name]}")
        build(tree, shards[name], splits=("train",), shorter_side=side, quality=spec.quality,
              workers=workers, shard_size_mb=spec.shard_size_mb, seed=spec.seed)
    stats = {"source": describe_tree(tree), **{name: describe_shards(p) for name, p in shards.items()}}
    shutil.rmtree(tree)  # the shards hold every image; the tree is only the packer's input
    done.write_text(json.dumps({"fingerprint": spec.fingerprint(), "spec": asdict(spec), "stats": stats},
                               indent=1))
    return Corpus(root, shards, stats)
