"""EXIF orientation is applied at packing, so every reader sees the same upright pixels.

DALI (2.4, CPU) applies a JPEG's orientation tag when it decodes (a 200x100 JPEG tagged 6
comes out 100 wide, 200 high, and `fn.peek_image_shape` says so); PIL, the manifest's sizes
and the torch baseline do not. Originals copied byte for byte would keep the tag, so the two
backends would train on differently turned images and the manifest would disagree with what
DALI decodes. The packer turns such images upright and drops the tag: checked here on the
raw bytes (DALI and PIL) and through both loaders of `make_loader`.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards.layouts import MANIFEST_FILE, split_tars
from shards.pack import build

WNIDS = ("n00000001", "n00000002")


def tagged(w: int, h: int, orientation: int) -> bytes:
    """Stored w x h, left half red, right half blue; EXIF orientation `orientation`."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (230, 20, 20)
    arr[:, w // 2:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def noise(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def dali_decode(data: bytes) -> tuple[tuple[int, ...], list[int]]:
    """(decoded HWC shape, fn.peek_image_shape) of one encoded image, DALI on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB), fn.peek_image_shape(enc)

    p = pipe()
    p.build()
    p.feed_input("enc", [np.frombuffer(data, np.uint8)])
    img, shape = p.run()
    return np.array(img.at(0)).shape, [int(v) for v in np.array(shape.at(0))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("oriented-tree")
    for i, wnid in enumerate(WNIDS):
        for split, n in (("train", 4), ("val", 2)):
            (src / split / wnid).mkdir(parents=True)
            for k in range(n):
                seed = 10 * i + k + (5 if split == "val" else 0)
                (src / split / wnid / f"{wnid}_{split}{k}.JPEG").write_bytes(noise(seed))
    (src / "val" / WNIDS[0] / "rot6.JPEG").write_bytes(tagged(200, 100, 6))  # small: copied, were it not tagged
    (src / "val" / WNIDS[1] / "rot8.JPEG").write_bytes(tagged(200, 100, 8))
    (src / "train" / WNIDS[0] / "rot6.JPEG").write_bytes(tagged(200, 100, 6))
    out = tmp_path_factory.mktemp("oriented") / "shards"
    build(src, out, shorter_side=0, workers=1, progress=False)
    return out


def stored(shards: Path, split: str, key: str) -> bytes:
    for tar in split_tars(shards, split):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name == f"{key}.jpg":
                    return t.extractfile(m).read()
    raise KeyError(key)


def test_dali_turns_a_tagged_jpeg_that_pil_does_not() -> None:
    original = tagged(200, 100, 6)
    assert Image.open(io.BytesIO(original)).size == (200, 100)  # PIL: as stored
    assert dali_decode(original) == ((200, 100, 3), [200, 100, 3])  # DALI: turned (H 200, W 100)


def test_packed_images_are_upright_with_the_manifest_size(shards: Path) -> None:
    rows = {(r["split"], r["key"]): r for r in pq.read_table(shards / MANIFEST_FILE).to_pylist()}
    for split, key in (("val", "rot6"), ("val", "rot8"), ("train", "rot6")):
        data, row = stored(shards, split, key), rows[(split, key)]
        assert (row["width"], row["height"]) == (100, 200)
        img = Image.open(io.BytesIO(data))
        assert img.size == (100, 200) and img.getexif().get(0x0112) is None
        assert dali_decode(data) == ((200, 100, 3), [200, 100, 3])  # what DALI decodes = the manifest


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_both_loaders_see_the_same_upright_pixels(shards: Path, backend: str) -> None:
    from pipeline import make_loader

    loader = make_loader(shards, split="val", batch_size=2, device="cpu", backend=backend, crop_size=64,
                         return_keys=True)
    seen = {}
    for images, _, keys in loader:
        seen.update(zip(keys, images))
    assert {"rot6", "rot8"} <= set(seen)
    for key, top in (("rot6", "red"), ("rot8", "blue")):  # 6: stored left (red) goes up; 8: right (blue) goes up
        img = seen[key].float()
        red_minus_blue = (img[0] - img[2]).mean(dim=1)  # per row, over the width
        upper, lower = red_minus_blue[:24].mean().item(), red_minus_blue[-24:].mean().item()
        assert (upper > 1 > -1 > lower) if top == "red" else (upper < -1 < 1 < lower), (key, upper, lower)
