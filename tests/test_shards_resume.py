"""Atomic, resumable packing: a SIGKILLed run re-run gives the clean run's bytes; settings
changes are refused without --overwrite."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shards.layouts import CLASSES_FILE, MANIFEST_FILE, PACK_DIR, REJECTS_FILE, SHARDS_FILE, STATS_FILE, split_tars
from shards.pack import build

ROOT = Path(__file__).resolve().parents[1]


def test_sigkilled_packer_resumes_to_the_clean_runs_output(demo_tree: Path, demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # the same settings as the demo_shards fixture (the clean run)
    cmd = [sys.executable, "-m", "shards", "build", "--source", str(demo_tree), "--out", str(out),
           "--shorter-side", "64", "--shard-size-mb", "0.05", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the fourth tar under its final name: its journal record is written before the rename, so
    # waiting for the record alone could kill the packer between the two (3 tars published)
    marker = out / "train" / "shard-000003.tar"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, f"packer ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "packer made no progress in 120 s"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the packer and its pool workers: our own group
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST_FILE).exists()
    published = split_tars(out, "train")
    assert 4 <= len(published) < len(split_tars(demo_shards, "train"))
    before = {p.name: p.stat().st_mtime_ns for p in published}

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in published} == before  # kept, not rewritten
    for split in ("train", "val"):
        ours, clean = split_tars(out, split), split_tars(demo_shards, split)
        assert [p.name for p in ours] == [p.name for p in clean]
        for a, b in zip(ours, clean):
            assert a.read_bytes() == b.read_bytes(), a
            assert a.with_suffix(".idx").read_bytes() == b.with_suffix(".idx").read_bytes(), a
    assert not list(out.rglob("*.tmp"))
    assert pq.read_table(out / MANIFEST_FILE).equals(pq.read_table(demo_shards / MANIFEST_FILE))
    assert pq.read_table(out / REJECTS_FILE).equals(pq.read_table(demo_shards / REJECTS_FILE))
    for name in (STATS_FILE, CLASSES_FILE, SHARDS_FILE):  # shards.parquet: the hashes kept in the journal
        assert (out / name).read_bytes() == (demo_shards / name).read_bytes()


def test_other_settings_are_refused_unless_overwrite(demo_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "val-only"
    first = build(demo_tree, out, splits=("val",), shorter_side=64, shard_size_mb=0.05, workers=1, progress=False)
    manifest = pq.read_table(out / MANIFEST_FILE)
    again = build(demo_tree, out, splits=("val",), shorter_side=64, shard_size_mb=0.05, workers=1, progress=False)
    assert (again.packed, again.shards, again.bytes) == (first.packed, first.shards, first.bytes)
    assert pq.read_table(out / MANIFEST_FILE).equals(manifest)
    with pytest.raises(ValueError, match=r"other settings \(shorter_side differ\).*--overwrite"):
        build(demo_tree, out, splits=("val",), shorter_side=32, shard_size_mb=0.05, workers=1, progress=False)
    build(demo_tree, out, splits=("val",), shorter_side=32, shard_size_mb=0.05, workers=1, progress=False,
          overwrite=True)
    rows = pq.read_table(out / MANIFEST_FILE).to_pylist()
    assert len(rows) == 50 and min(min(r["width"], r["height"]) for r in rows) == 32


def test_foreign_non_empty_output_is_refused(demo_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and not written by the packer"):
        build(demo_tree, out, splits=("val",), workers=1, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_journal_from_before_parts_resumes(demo_tree: Path, tmp_path: Path) -> None:
    """Journals written before the per-shard parts held the rows and rejects in each record:
    a re-run over one keeps its shards and writes the same manifest."""
    import json

    out = tmp_path / "legacy"
    build(demo_tree, out, splits=("val",), shorter_side=64, shard_size_mb=0.05, workers=1, progress=False)
    manifest = pq.read_table(out / MANIFEST_FILE)
    for record in sorted((out / PACK_DIR / "val").glob("*.json")):
        part = record.with_suffix(".parquet")
        rows = pq.read_table(part).to_pylist()
        rec = json.loads(record.read_text())
        rec["rows"] = [[r[k] for k in manifest.column_names] for r in rows if r["reason"] is None]
        rec["rejects"] = [[r["source"], r["split"], r["reason"]] for r in rows if r["reason"] is not None]
        del rec["unreadable"]
        record.write_text(json.dumps(rec))
        part.unlink()
    (out / MANIFEST_FILE).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in split_tars(out, "val")}
    again = build(demo_tree, out, splits=("val",), shorter_side=64, shard_size_mb=0.05, workers=1, progress=False)
    assert again.kept == len(before) and {p.name: p.stat().st_mtime_ns for p in split_tars(out, "val")} == before
    assert pq.read_table(out / MANIFEST_FILE).equals(manifest)
