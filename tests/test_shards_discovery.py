"""The packer's discovery at ImageNet-21k size (issue 23, finding 7): its memory per listed item
is a few bytes (it held ~256 B per item, 5.5 GB at 14 million images), duplicate keys are named
exactly as before, and a tree of 21,841 classes (most of them empty) packs with labels, class
names and `.cls` members that round-trip through verify and the loader."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import shards.listing as listing
from shards.layouts import CLASSES_FILE, MANIFEST_FILE, split_tars
from shards.pack import build
from shards.verify import verify

HELPER = Path(__file__).parent / "helpers" / "discovery_memory.py"
CLASSES_21K = 21841
# Bytes the packer may hold per listed item before encoding (discovery, plan, fingerprint):
# an 8-byte key hash while a split is listed, the 8-byte permutation while the plan is written.
# Before the spill it was ~256 (tests/helpers/discovery_memory.py, docs/SCALING.md).
BYTES_PER_ITEM = 32


def _measure(root: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, str(HELPER), str(root), str(n), "--classes", "100", "--generated"],
                         check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_discovery_memory_per_item_is_a_few_bytes(tmp_path: Path) -> None:
    """Python's heap (tracemalloc) and Arrow's pool, peak, at 70k and 280k listed items: what
    grows with the items, per item, stays under BYTES_PER_ITEM; nothing per item is held after."""
    small, large = _measure(tmp_path, 70_000), _measure(tmp_path, 280_000)
    assert (small["items"], large["items"]) == (70_000, 280_000)
    grown = (large["py_peak"] + large["arrow_peak"]) - (small["py_peak"] + small["arrow_peak"])
    per_item = grown / (large["items"] - small["items"])
    assert per_item < BYTES_PER_ITEM, (per_item, small, large)
    assert large["py_held"] < 1_000_000, large  # the lists are on disk, not in the heap
    assert large["arrow_peak"] < 16_000_000, large  # one chunk of the plan being written, whatever N


@pytest.mark.parametrize("collide", [False, True], ids=["hashes", "every-hash-shared"])
def test_duplicate_keys_get_the_names_a_full_dictionary_gives(tmp_path: Path, monkeypatch, collide: bool) -> None:
    """Keys are told apart by an 8-byte hash each, not a dictionary of every key; the names given to
    duplicates (and to keys that look like the names given) are those the full dictionary gave."""
    if collide:  # every key shares one hash: every key goes through the exact path
        monkeypatch.setattr(listing, "hash", lambda key: 7, raising=False)
    monkeypatch.setattr(listing, "BATCH", 4)  # several batches, a rename crossing them
    keys = ["a", "b", "a", "a_dup1", "c", "a", "b_dup1", "b", "b", "x_dup3", "x", "x", "x", "x", "d", "a_dup1"]
    seen: dict[str, int] = {}
    expected = [listing.unique_key(k, seen) for k in keys]
    assert expected[:4] == ["a", "b", "a_dup1", "a_dup1_dup1"]
    writer = listing.ListingWriter(tmp_path / "train.arrow", "train", ["n0"], 1)
    for i, key in enumerate(keys):
        writer.add(f"train/n0/{i}.JPEG".encode(), 0, key)
    listed = writer.close()
    assert [it.key for it in listed] == expected
    assert [it.source for it in listed] == [f"train/n0/{i}.JPEG" for i in range(len(keys))]
    assert listed[len(keys) - 1].key == expected[-1] and listed[-1] == listed[len(keys) - 1]


def _tiny_jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_21841_classes_pack_and_round_trip(tmp_path: Path) -> None:
    """ImageNet-21k's class count: 21,841 class folders, images in a few (the first, the last and
    labels of 1 to 5 digits), the rest empty; classes.json lists every class in sorted order
    with its name, labels are the sorted index, and the `.cls` bytes, verify and the loader agree."""
    src = tmp_path / "src"
    wnids = [f"n{10_000_000 + 37 * i:08d}" for i in range(CLASSES_21K)]  # sorted, like real wnids
    for wnid in wnids:
        (src / "train" / wnid).mkdir(parents=True)
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} synset {i}, other name\n" for i, w in enumerate(wnids)))
    used = [0, 7, 99, 1000, 10_000, 21_839, 21_840]
    for n, label in enumerate(used):
        for i in range(2):
            (src / "train" / wnids[label] / f"{wnids[label]}_{i}.JPEG").write_bytes(_tiny_jpeg(10 * n + i))
        (src / "val" / wnids[label]).mkdir(parents=True)
        (src / "val" / wnids[label] / f"ILSVRC_val_{n}.JPEG").write_bytes(_tiny_jpeg(1000 + n))
    out = tmp_path / "out"
    summary = build(src, out, workers=1, shorter_side=0, progress=False)
    assert (summary.packed, summary.rejected) == (3 * len(used), 0)

    classes = json.loads((out / CLASSES_FILE).read_text())
    assert len(classes) == CLASSES_21K
    assert [c["wnid"] for c in classes] == wnids and [c["index"] for c in classes] == list(range(CLASSES_21K))
    assert classes[21_840]["name"] == "synset 21840"
    manifest = pq.read_table(out / MANIFEST_FILE).to_pylist()
    assert sorted({r["label"] for r in manifest}) == used
    assert all(r["label"] == wnids.index(r["wnid"]) for r in manifest)
    stored = {}
    for split in ("train", "val"):
        for sample in wds.WebDataset([str(t) for t in split_tars(out, split)], shardshuffle=False):
            stored[(split, sample["__key__"])] = int(sample["cls"])
    assert stored == {(r["split"], r["key"]): r["label"] for r in manifest}
    assert verify(out, workers=1).ok

    from pipeline import make_loader

    loader = make_loader(out, "val", batch_size=4, device="cpu", crop_size=8, return_keys=True, num_threads=1)
    read = {key: int(label) for _, labels, keys in loader for key, label in zip(keys, labels)}
    assert read == {r["key"]: r["label"] for r in manifest if r["split"] == "val"}
