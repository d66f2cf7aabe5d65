"""The packer on real quirky files, in each val layout: CMYK, PNG named .JPEG, greyscale,
progressive, huge, zero-byte, text, truncated, dotted and duplicate names."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from shards.layouts import MANIFEST_FILE, REJECTS_FILE, split_tars
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
        "n00000002/n00000002_a.b.jpg": (jpeg(80, 80, seed=7), "reencode"),  # key a_b
        "n00000002/n00000001_1.jpeg": (jpeg(80, 80, seed=8), "reencode"),  # stem clash with class 1
        "n00000003/n00000003_1.png": (jpeg(66, 99, "RGB", seed=9, format="PNG"), "reencode"),
    }


def _huge() -> bytes:
    buf = io.BytesIO()  # 5000x4000 but flat, so cheap to write and small on disk
    Image.new("RGB", (5000, 4000), (200, 30, 90)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


VAL = {f"ILSVRC2012_val_{i:08d}": WNIDS[i % 3] for i in range(1, 7)}


def make_tree(root: Path, layout: str) -> Path:
    for rel, (data, _) in train_files().items():
        (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / rel).write_bytes(data)
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
    inputs = {str(p.relative_to(src)) for p in (src / "train").rglob("*") if p.is_file()}
    inputs |= {str(p.relative_to(src)) for p in (src / "val").rglob("*") if p.is_file()}
    assert set(manifest) | set(rejects) == inputs and not set(manifest) & set(rejects)
    assert (summary.packed, summary.rejected) == (len(manifest), len(rejects))
    for rel, (data, expect) in train_files().items():
        source = f"train/{rel}"
        if expect in ("copy", "reencode"):
            row = manifest[source]
            assert row["wnid"] == Path(rel).parent.name and row["label"] == WNIDS.index(row["wnid"])
        else:
            assert expect in rejects[source]["reason"], rejects[source]
    keys = {r["key"] for r in manifest.values() if r["split"] == "train"}
    assert {"n00000002_a_b", "n00000001_1", "n00000001_1_dup1"} <= keys
    huge = manifest["train/n00000001/n00000001_huge.JPEG"]
    assert (huge["width"], huge["height"]) == ((5000, 4000) if shorter_side == 0 else (80, 64))
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
    for split in ("train", "val"):
        for tar in split_tars(out, split):
            ref = tmp_path / "ref.idx"
            subprocess.run([str(WDS2IDX), str(tar), str(ref)], check=True, capture_output=True)
            assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes()
    assert verify(out, workers=1).ok


def test_flat_val_without_labels_names_the_expected_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", "loc-csv")
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        build(src, tmp_path / "out", workers=1, progress=False)
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_validation_wnids.txt"):
        build(src, tmp_path / "out", workers=1, progress=False)


def test_kaggle_nesting_is_found(tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    make_tree(src / "ILSVRC" / "Data" / "CLS-LOC", "loc-csv")
    shutil.move(src / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv", src / "LOC_val_solution.csv")
    summary = build(src, tmp_path / "out", splits=("val",), workers=1, progress=False)
    assert (summary.packed, summary.rejected) == (6, 1)
