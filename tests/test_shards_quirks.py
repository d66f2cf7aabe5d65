"""The packer on real quirky files, in each val layout: CMYK, PNG named .JPEG, greyscale,
progressive, huge, zero-byte, text and HTML, truncated, 16-bit and palette PNGs, EXIF
orientation, animated GIF and WebP named .JPEG, a 20,000-pixel side, a decompression bomb,
dotted, duplicate, spaced and non-UTF-8 names, symbolic links (good and broken), a directory
and a FIFO named like images, a stray file outside the class folders; and wnid lists in the
wrong order. Every input ends up packed or in rejects with its reason; none stops the job."""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageOps

from shards.layouts import MANIFEST_FILE, REJECTS_FILE, display_path, split_tars
from shards.pack import build
from shards.verify import verify

WNIDS = ("n00000001", "n00000002", "n00000003")
WDS2IDX = Path(sys.executable).parent / "wds2idx"


def jpeg(w: int, h: int, mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    bands = len(mode) if mode != "L" else 1
    arr = rng.integers(0, 255, (h, w, bands), dtype=np.uint8).squeeze(-1 if bands == 1 else ())
    img = Image.fromarray(arr) if mode in ("RGB", "L") else Image.fromarray(arr[..., :4], "RGBA").convert(mode)
    buf = io.BytesIO()
    img.save(buf, save.pop("format", "JPEG"), **save)
    return buf.getvalue()


def with_orientation(w: int, h: int, orientation: int) -> bytes:
    """A baseline RGB JPEG, stored w x h, whose EXIF says to show it turned (6: 90 degrees
    clockwise): left half red, right half blue as stored."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (230, 20, 20)
    arr[:, w // 2:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png16() -> bytes:
    """16-bit greyscale PNG, a ramp over the whole 0..65535 range (mean 32767)."""
    ramp = np.linspace(0, 65535, 60 * 50).reshape(50, 60).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    return buf.getvalue()


def palette_png() -> bytes:
    img = Image.fromarray(np.random.default_rng(11).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)) for i in range(1, 4)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def wide() -> bytes:
    buf = io.BytesIO()  # a 20,000-pixel side, flat, so small on disk
    Image.new("RGB", (20000, 300), (40, 160, 90)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def bomb() -> bytes:
    """A small JPEG whose header claims 20,000 x 20,000 pixels (400 MP, past Pillow's limit)."""
    data = bytearray(jpeg(16, 16, seed=12))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    return bytes(data)


# name -> (bytes, expected: "copy" | "reencode" | reject-reason fragment)
def train_files() -> dict[str, tuple[bytes, str]]:
    good = jpeg(100, 120, seed=1)
    return {
        "n00000001/n00000001_1.JPEG": (jpeg(60, 50, seed=2), "copy"),  # baseline RGB, small: copied
        "n00000001/n00000001_2.JPEG": (good, "reencode"),
        "n00000001/n00000001_cmyk.JPEG": (jpeg(90, 70, "CMYK", seed=3), "reencode"),
        "n00000001/n00000001_png.JPEG": (jpeg(80, 90, seed=4, format="PNG"), "reencode"),
        "n00000001/n00000001_grey.JPEG": (jpeg(70, 100, "L", seed=5), "reencode"),
        "n00000001/n00000001_prog.JPEG": (jpeg(60, 60, seed=6, progressive=True), "reencode"),
        "n00000001/n00000001_huge.JPEG": (_huge(), "reencode"),
        "n00000001/n00000001_zero.JPEG": (b"", "empty file"),
        "n00000001/n00000001_text.JPEG": (b"this is not an image\n" * 20, "not an image"),
        "n00000001/n00000001_trunc.JPEG": (good[: len(good) // 2], "truncated"),
        "n00000001/README.txt": (b"notes", "not an image file name"),
        "n00000001/n00000001_html.JPEG": (b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
                                          "not an image"),
        "n00000001/n00000001_png16.JPEG": (png16(), "reencode"),
        "n00000001/n00000001_palette.png": (palette_png(), "reencode"),
        "n00000001/n00000001_exif6.JPEG": (with_orientation(80, 40, 6), "reencode"),  # small: would be copied
        "n00000001/n00000001_exif3.JPEG": (with_orientation(120, 90, 3), "reencode"),
        "n00000001/n00000001_gif.JPEG": (animated("GIF"), "reencode"),
        "n00000001/n00000001_webp.JPEG": (animated("WEBP"), "reencode"),
        "n00000001/n00000001_wide.JPEG": (wide(), "reencode"),
        "n00000001/n00000001_bomb.JPEG": (bomb(), "too large to decode safely"),
        "n00000002/sp ace & \u00fcmlaut.jpg": (jpeg(70, 70, seed=13), "reencode"),  # key sp_ace____mlaut
        "n00000002/n00000002_a.b.jpg": (jpeg(80, 80, seed=7), "reencode"),  # key a_b
        "n00000002/n00000001_1.jpeg": (jpeg(80, 80, seed=8), "reencode"),  # stem clash with class 1
        "n00000003/n00000003_1.png": (jpeg(66, 99, "RGB", seed=9, format="PNG"), "reencode"),
    }


def _huge() -> bytes:
    buf = io.BytesIO()  # 5000x4000 but flat, so cheap to write and small on disk
    Image.new("RGB", (5000, 4000), (200, 30, 90)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


# entries that are not plain files: name -> expected (reject-reason fragment, or "reencode")
SPECIAL = {
    "n00000002/n00000002_link.JPEG": "reencode",  # a symbolic link to an image outside the tree: followed
    "n00000002/n00000002_dangling.JPEG": "broken symbolic link",
    "n00000002/n00000002_dir.JPEG": "a directory, not an image file",
    "n00000002/n00000002_fifo.JPEG": "not a regular file (a FIFO)",
    "n00000003/caf\udce9.JPEG": "reencode",  # the bytes b"caf\xe9.JPEG": Latin-1, not UTF-8
}


def make_special(train: Path) -> None:
    elsewhere = train.parent.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "real.JPEG").write_bytes(jpeg(90, 60, seed=14))
    (train / "n00000002" / "n00000002_link.JPEG").symlink_to(elsewhere / "real.JPEG")
    (train / "n00000002" / "n00000002_dangling.JPEG").symlink_to(elsewhere / "gone.JPEG")
    (train / "n00000002" / "n00000002_dir.JPEG").mkdir()
    (train / "n00000002" / "n00000002_dir.JPEG" / "inside.JPEG").write_bytes(jpeg(20, 20, seed=15))
    os.mkfifo(train / "n00000002" / "n00000002_fifo.JPEG")
    with open(os.fsencode(train / "n00000003") + b"/caf\xe9.JPEG", "wb") as f:
        f.write(jpeg(50, 70, seed=16))
    (train / "stray.JPEG").write_bytes(jpeg(20, 20, seed=17))  # not in a class folder
    shutil.move(train / "n00000003", elsewhere / "class-3")  # a class folder that is a symbolic link
    (train / "n00000003").symlink_to(elsewhere / "class-3")


def listed(root: Path, split: str) -> set[str]:
    """Every entry the packer must account for: the entries of each class folder (or of a
    flat val/) and anything else directly in the split's folder, as the manifest names them."""
    found = set()
    for entry in os.scandir(root / split):
        is_class = entry.is_dir() and Path(entry.name).suffix.lower() not in (".jpeg", ".jpg", ".png")
        for e in os.scandir(entry.path) if is_class else [entry]:
            found.add(display_path(os.path.relpath(e.path, root)))
    return found


VAL = {f"ILSVRC2012_val_{i:08d}": WNIDS[i % 3] for i in range(1, 7)}


def make_tree(root: Path, layout: str, quirky: bool = True) -> Path:
    """The quirky train set (or, with `quirky=False`, one plain image per class) and the
    six val images in `layout`."""
    plain = {f"{w}/{w}_1.JPEG": (jpeg(40, 30, seed=i), "copy") for i, w in enumerate(WNIDS)}
    files = train_files() if quirky else plain
    for rel, (data, _) in files.items():
        (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / rel).write_bytes(data)
    if quirky:
        make_special(root / "train")
    (root / "val").mkdir()
    for i, (stem, wnid) in enumerate(VAL.items()):
        folder = root / "val" / wnid if layout == "per-class" else root / "val"
        folder.mkdir(exist_ok=True)
        (folder / f"{stem}.JPEG").write_bytes(jpeg(100, 80, seed=100 + i))
    if layout != "per-class":  # one flat val image no labels file mentions
        (root / "val" / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg(50, 50, seed=99))
    if layout == "loc-csv":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for stem, wnid in VAL.items():
                w.writerow([stem, f"{wnid} 1 2 30 40 {wnid} 5 6 70 80 "])
    elif layout == "ground-truth":
        # ILSVRC2012_ID order differs from sorted order: ID 1 = WNIDS[2], ID 2 = WNIDS[0], ID 3 = WNIDS[1]
        by_id = [WNIDS[2], WNIDS[0], WNIDS[1]]
        (root / "ILSVRC2012_validation_wnids.txt").write_text("\n".join(by_id) + "\n")
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{by_id.index(w) + 1}\n" for w in VAL.values()))
    return root


@pytest.mark.parametrize("layout,shorter_side", [("per-class", 64), ("loc-csv", 64), ("ground-truth", 0)])
def test_quirky_tree_packs_with_nothing_lost(tmp_path: Path, layout: str, shorter_side: int) -> None:
    src = make_tree(tmp_path / "src", layout)
    out = tmp_path / "out"
    summary = build(src, out, shorter_side=shorter_side, shard_size_mb=0.01, workers=1, progress=False)
    manifest = {r["source"]: r for r in pq.read_table(out / MANIFEST_FILE).to_pylist()}
    rejects = {r["source"]: r for r in pq.read_table(out / REJECTS_FILE).to_pylist()}
    inputs = listed(src, "train") | listed(src, "val")
    assert set(manifest) | set(rejects) == inputs and not set(manifest) & set(rejects)
    assert (summary.packed, summary.rejected) == (len(manifest), len(rejects))
    expected = {rel: expect for rel, (_, expect) in train_files().items()} | SPECIAL
    for rel, expect in expected.items():
        source = display_path(f"train/{rel}")
        if expect in ("copy", "reencode"):
            row = manifest[source]
            assert row["wnid"] == Path(rel).parent.name and row["label"] == WNIDS.index(row["wnid"])
        else:
            assert expect in rejects[source]["reason"], rejects[source]
    assert "not in a class folder" in rejects["train/stray.JPEG"]["reason"]
    keys = {r["key"] for r in manifest.values() if r["split"] == "train"}
    assert {"n00000002_a_b", "n00000001_1", "n00000001_1_dup1", "sp_ace____mlaut", "caf_"} <= keys
    assert manifest["train/n00000003/caf\\xe9.JPEG"]["key"] == "caf_"
    huge = manifest["train/n00000001/n00000001_huge.JPEG"]
    assert (huge["width"], huge["height"]) == ((5000, 4000) if shorter_side == 0 else (80, 64))
    long = manifest["train/n00000001/n00000001_wide.JPEG"]
    assert (long["width"], long["height"]) == ((20000, 300) if shorter_side == 0 else (4267, 64))
    turned = manifest["train/n00000001/n00000001_exif6.JPEG"]  # stored 80x40, shown 40x80
    assert (turned["width"], turned["height"]) == (40, 80)
    flipped = manifest["train/n00000001/n00000001_exif3.JPEG"]
    assert (flipped["width"], flipped["height"]) == ((120, 90) if shorter_side == 0 else (85, 64))
    val = {Path(r["source"]).stem: r for r in manifest.values() if r["split"] == "val"}
    assert {stem: r["wnid"] for stem, r in val.items()} == VAL
    if layout != "per-class":
        assert "no label" in rejects["val/ILSVRC2012_val_00000099.JPEG"]["reason"]

    # stored bytes: originals copied untouched where allowed, otherwise baseline RGB JPEGs
    stored = {}
    for split in ("train", "val"):
        for sample in wds.WebDataset([str(t) for t in split_tars(out, split)], shardshuffle=False):
            stored[(split, sample["__key__"])] = sample
    assert len(stored) == len(manifest)
    for row in manifest.values():
        sample = stored[(row["split"], row["key"])]
        assert int(sample["cls"]) == row["label"]
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
        assert img.size == (row["width"], row["height"]) and len(sample["jpg"]) == row["nbytes"]
    copied = stored[("train", "n00000001_1")]["jpg"]
    assert copied == train_files()["n00000001/n00000001_1.JPEG"][0]
    # EXIF orientation applied, tag dropped: the stored pixels are the upright image
    for key in ("n00000001_exif6", "n00000001_exif3"):
        img = Image.open(io.BytesIO(stored[("train", key)]["jpg"]))
        assert img.getexif().get(0x0112) is None
        original = train_files()[f"n00000001/{key}.JPEG"][0]
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(original))).resize(img.size, Image.BILINEAR)
        assert np.abs(np.asarray(img, np.float32) - np.asarray(upright, np.float32)).mean() < 6, key
    # 16-bit greyscale scaled to 8 bits (not clipped to white), palette and animations converted
    grey = np.asarray(Image.open(io.BytesIO(stored[("train", "n00000001_png16")]["jpg"])), np.float32)
    assert abs(grey.mean() - 32767 / 257) < 3 and grey.min() < 10 and grey.max() > 245
    first = np.asarray(Image.open(io.BytesIO(stored[("train", "n00000001_gif")]["jpg"])), np.float32)
    assert abs(first.mean() - 60) < 4  # the first frame
    assert stored[("train", "n00000002_link")]["jpg"]
    for split in ("train", "val"):
        for tar in split_tars(out, split):
            ref = tmp_path / "ref.idx"
            subprocess.run([str(WDS2IDX), str(tar), str(ref)], check=True, capture_output=True)
            assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes()
    assert verify(out, workers=1).ok


def test_flat_val_without_labels_names_the_expected_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "loc-csv", quirky=False)
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        build(src, tmp_path / "out", workers=1, progress=False)
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_validation_wnids.txt"):
        build(src, tmp_path / "out", workers=1, progress=False)


def test_kaggle_nesting_is_found(tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    make_tree(src / "ILSVRC" / "Data" / "CLS-LOC", "loc-csv", quirky=False)
    shutil.move(src / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv", src / "LOC_val_solution.csv")
    summary = build(src, tmp_path / "out", splits=("val",), workers=1, progress=False)
    assert (summary.packed, summary.rejected) == (6, 1)


@pytest.mark.parametrize("name", ["synsets.txt", "ILSVRC2012_validation_wnids.txt"])
def test_a_wnid_list_in_sorted_order_is_refused(tmp_path: Path, name: str) -> None:
    """Caffe's synsets.txt (and LOC_synset_mapping.txt) are sorted; the ground truth counts
    classes in the devkit's ILSVRC2012_ID order. Taken for it, a sorted list would label every
    val image with a wrong class and no error: it is refused, naming the file to use."""
    src = make_tree(tmp_path / "src", "ground-truth", quirky=False)
    (src / "ILSVRC2012_validation_wnids.txt").unlink()
    (src / name).write_text("\n".join(sorted(WNIDS)) + "\n")
    ids = [int(t) for t in (src / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    assert [sorted(WNIDS)[i - 1] for i in ids] != list(VAL.values())  # what it would have done
    with pytest.raises(ValueError, match=rf"{name}: its wnids are in sorted order.*every val label would be wrong"
                                         r".*ILSVRC2012_validation_wnids.txt written from the devkit's data/meta.mat"):
        build(src, tmp_path / "out", workers=1, progress=False)
    res = subprocess.run([sys.executable, "-m", "shards", "build", "--source", str(src), "--out", str(tmp_path / "o")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and name in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()  # refused before any output


def test_a_ground_truth_id_beyond_the_list_is_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "ground-truth", quirky=False)
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n9\n3\n1\n2\n")
    with pytest.raises(ValueError, match=r"names class ID 9 but .* lists 3 wnids"):
        build(src, tmp_path / "out", workers=1, progress=False)
