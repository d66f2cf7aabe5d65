"""`python -m shards`: verify catches corruption; bad input gets one clear line, no traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shards_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def idx_entries(idx: Path) -> list[dict[str, tuple[int, int]]]:
    entries = []
    for line in idx.read_text().splitlines()[1:]:
        p = line.split(" ")
        entries.append({p[i]: (int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p), 4)})
    return entries


def test_verify_passes_on_clean_shards(demo_shards: Path) -> None:
    res = shards_cli("verify", str(demo_shards), "--workers", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verified 290 samples" in res.stdout and "OK" in res.stdout


def test_verify_names_the_corrupted_shard_and_key(demo_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(demo_shards, bad)
    tar = bad / "val" / "shard-000001.tar"
    entries = idx_entries(tar.with_suffix(".idx"))
    jpg_off, _, jpg_name = entries[0]["jpg"]
    cls_off, _, cls_name = entries[1]["cls"]
    with open(tar, "r+b") as f:
        f.seek(jpg_off)
        f.write(b"\x00\x00")  # break the JPEG's SOI marker
        f.seek(cls_off)
        old = f.read(1)
        f.seek(cls_off)
        f.write(b"9" if old != b"9" else b"8")  # a wrong label
    res = shards_cli("verify", str(bad), "--workers", "1")
    assert res.returncode == 1
    key0, key1 = jpg_name.split(".")[0], cls_name.split(".")[0]
    assert f"val/shard-000001.tar key {key0}: image" in res.stdout
    assert f"val/shard-000001.tar key {key1}: label" in res.stdout
    assert "val/shard-000001.tar: sha256 " in res.stdout and "!= shards.parquet" in res.stdout
    assert "FAILED: 3 problems" in res.stdout
    # a set without shards.parquet (another tool's): the same findings, no checksum check
    (bad / "shards.parquet").unlink()
    res = shards_cli("verify", str(bad), "--workers", "1")
    assert res.returncode == 1 and "sha256" not in res.stdout and "FAILED: 2 problems" in res.stdout


def test_verify_catches_a_missing_shard_and_a_stale_index(demo_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(demo_shards, bad)
    (bad / "train" / "shard-000002.tar").unlink()
    idx = bad / "train" / "shard-000000.idx"
    idx.write_text(idx.read_text().replace("v1.2 ", "v1.2 1", 1))
    res = shards_cli("verify", str(bad), "--workers", "1")
    assert res.returncode == 1
    assert "train/shard-000002.tar key" in res.stdout and "shard is missing" in res.stdout
    assert "train/shard-000000.tar: index shard-000000.idx does not match the tar" in res.stdout


@pytest.mark.parametrize("args,fragment", [
    (["build", "--source", "/nonexistent/imagenet", "--out", "{tmp}/o"],
     "/nonexistent/imagenet: source directory not found"),
    (["build", "--source", "{tmp}", "--out", "{tmp}/o"], "no train/ or val/ folder"),
    (["build", "--source", "{tree}", "--out", "{tmp}/file/o"], "output not writable"),
    (["build", "--source", "{tree}", "--out", "{tmp}/o", "--shard-size-mb", "0"], "--shard-size-mb must be > 0"),
    (["build", "--source", "{tree}", "--out", "{tmp}/o", "--splits", "train,test"], "--splits must name"),
    (["verify", "{tmp}"], "manifest.parquet: not found"),
    (["demo", "--out", "{tmp}/d", "--classes", "11"], "--classes must be between 1 and 10"),
])
def test_bad_input_is_one_clear_line(demo_tree: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    res = shards_cli(*(a.format(tmp=tmp_path, tree=demo_tree) for a in args))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], res.stderr


def test_no_classes_is_reported(tmp_path: Path) -> None:
    (tmp_path / "src" / "train").mkdir(parents=True)
    res = shards_cli("build", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "no classes found" in res.stderr
