"""The packer under faults, on real processes and files (no mocks): SIGKILLed at 10%, 50% and
90% and re-run, a pool worker SIGKILLed (the OOM killer's way), a full disk, files that vanish
or turn unreadable while it runs, transient EIO, and its memory as the input grows.

Each scenario ends by comparing a sha256 of every output file (journal included) with an
uninterrupted run of the same command. docs/RELIABILITY.md lists what each test showed.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.pack import measure_pack
from shards.layouts import MANIFEST_FILE, PACK_DIR, REJECTS_FILE

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--shorter-side", "32", "--shard-size-mb", "0.1", "--workers", "2", "--no-progress"]
WNIDS = [f"n{10000000 + k:08d}" for k in range(10)]


def write_tree(root: Path, train: int, val: int, seed: int = 0, sides: tuple[int, int] = (40, 64),
               quality: int = 90, grain: int = 8) -> Path:
    """`train` + `val` distinct JPEGs (noise in cells of `grain` px), 10 classes, Kaggle val layout."""
    rng = np.random.default_rng(seed)

    def image(path: Path) -> None:
        w, h = (int(s) for s in rng.integers(sides[0], sides[1] + 1, 2))
        small = rng.integers(0, 256, (max(2, h // grain), max(2, w // grain), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, "JPEG", quality=quality)

    for i in range(train):
        wnid = WNIDS[i % len(WNIDS)]
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        image(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    (root / "val").mkdir(parents=True, exist_ok=True)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i in range(val):
            stem = f"ILSVRC2012_val_{i + 1:08d}"
            image(root / "val" / f"{stem}.JPEG")
            w.writerow([stem, f"{WNIDS[i % len(WNIDS)]} 1 1 9 9 "])
    return root


def packer(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shards", "build", "--source", str(src), "--out", str(out), *SETTINGS, *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def records(out: Path) -> int:
    """Shards committed so far (journal records)."""
    return sum(1 for split in ("train", "val") for _ in (out / PACK_DIR / split).glob("*.json"))


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def encoders(pid: int) -> list[int]:
    """The packer's encoder processes (multiprocessing spawn children; not its resource tracker)."""
    found = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def kill_when(cmd: list[str], ready, deadline_s: float = 120) -> subprocess.Popen:
    """Start `cmd` in its own process group and SIGKILL the group once `ready()` holds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + deadline_s
    try:
        while not ready():
            assert proc.poll() is None, f"packer ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "packer made no progress"
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the packer and its workers: our own group
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc


def check_complete(out: Path, clean: Path) -> None:
    """`out` holds exactly the clean run's files, byte for byte; nothing lost or duplicated."""
    ours, theirs = hashes(out), hashes(clean)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []
    keys = [(r["split"], r["key"]) for r in pq.read_table(out / MANIFEST_FILE).to_pylist()]
    assert len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 small images: 2,700 train, 300 val."""
    return write_tree(tmp_path_factory.mktemp("faults-tree"), train=2700, val=300)


@pytest.fixture(scope="module")
def clean(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults-clean") / "shards"
    res = run(packer(tree, out))
    assert res.returncode == 0, res.stderr
    return out


def test_sigkill_at_10_50_90_percent_resumes_to_the_same_bytes(tree: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    total = records(clean)
    assert total >= 50  # enough shards that 10%, 50% and 90% are distinct points of the run
    seen = []
    for fraction in (0.1, 0.5, 0.9):
        target = math.ceil(total * fraction)
        kill_when(packer(tree, out), lambda target=target: records(out) >= target)
        seen.append(records(out))
        assert not (out / MANIFEST_FILE).exists()
    assert seen[0] < seen[1] < seen[2] < total, seen
    res = run(packer(tree, out))
    assert res.returncode == 0, res.stderr
    assert not list(out.rglob("*.tmp"))
    check_complete(out, clean)
    manifest = pq.read_table(out / MANIFEST_FILE)
    assert manifest.num_rows + pq.read_table(out / REJECTS_FILE).num_rows == 3000
    print(f"\nkills at {seen} of {total} shards; 4 runs; {manifest.num_rows} samples, none lost or duplicated")


def test_a_killed_worker_stops_the_packer_with_one_line(tree: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "oom"
    proc = subprocess.Popen(packer(tree, out), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while records(out) < 3 or len(encoders(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        workers = encoders(proc.pid)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)  # what the OOM killer does
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr
    # busy or between jobs when the signal lands (the machine's load decides): either is named
    assert re.match(rf"error: packer worker {victim} was killed by SIGKILL \(the kernel's out-of-memory killer, or "
                    r"by hand\) while (encoding .*\.JPEG|idle).*re-run the same command to resume", lines[0]), lines[0]
    time.sleep(1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]  # the other worker is gone too
    print(f"\nworker {victim} killed: packer exited {elapsed:.2f} s later: {lines[0]}")
    res = run(packer(tree, out))
    assert res.returncode == 0, res.stderr
    check_complete(out, clean)


def test_packer_memory_does_not_grow_with_the_input(tmp_path: Path) -> None:
    """Peak RSS of the packer process at 2,000 and 8,000 inputs: the manifest and rejects are
    streamed (per-shard parts), so only the file list grows with the input."""
    seedimgs = [np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(16)]
    blobs = []
    for arr in seedimgs:
        path = tmp_path / "one.jpg"
        Image.fromarray(arr).save(path, "JPEG", quality=90)
        blobs.append(path.read_bytes())
    big, small = tmp_path / "8k", tmp_path / "2k"
    for i in range(8000):
        wnid = WNIDS[i % 10]
        for root in (big, small) if i < 2000 else (big,):
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(blobs[i % len(blobs)])
    settings = dict(splits=["train"], shorter_side=0, workers=2, shard_size_mb=0.25)
    at_2k = measure_pack(small, tmp_path / "out", **settings)
    at_8k = measure_pack(big, tmp_path / "out", **settings)
    assert (at_2k["packed"], at_8k["packed"]) == (2000, 8000)
    growth = at_8k["main_rss_mb"] - at_2k["main_rss_mb"]
    per_image = growth * 1024 * 1024 / 6000
    print(f"\npeak RSS packer {at_2k['main_rss_mb']:.1f} MB at 2k, {at_8k['main_rss_mb']:.1f} MB at 8k "
          f"({per_image:.0f} B per extra input); largest worker {at_2k['worker_rss_mb']:.1f} / "
          f"{at_8k['worker_rss_mb']:.1f} MB; shards {at_2k['shards']} / {at_8k['shards']}")
    assert per_image < 1000, f"packer memory grows {per_image:.0f} B per input"  # ~1,450 B when the manifest was held
    assert at_8k["worker_rss_mb"] - at_2k["worker_rss_mb"] < 5


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 20 MB tmpfs (root only); unmounted at the end whatever happens."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'}): the full-disk test needs it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_with_the_space_needed_and_resumes(small_disk: Path, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", train=700, val=50, sides=(150, 200), quality=95, grain=1)
    cmd = [sys.executable, "-m", "shards", "build", "--source", str(src), "--shorter-side", "0",
           "--shard-size-mb", "1", "--workers", "2", "--no-progress"]
    clean = tmp_path / "clean"
    assert run(cmd + ["--out", str(clean)]).returncode == 0
    total_mb = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file()) / 1e6
    assert total_mb > 25  # it cannot fit in 20 MB
    out = small_disk / "shards"
    t0 = time.monotonic()
    res = run(cmd + ["--out", str(out)])
    elapsed = time.monotonic() - t0
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    m = re.match(rf"error: {re.escape(str(out))}: disk full \(([\d.]+) MB free\); about ([\d.]+) MB more are needed "
                 r"to finish \((\d+) images left", lines[0])
    assert m, lines[0]
    # nothing half-written under a final name: every tar there is committed, with its recorded bytes
    assert not list(out.rglob("*.tmp"))
    tars = sorted(out.glob("*/*.tar"))
    assert tars
    for tar in tars:
        rec = (out / PACK_DIR / tar.parent.name / (tar.name + ".json"))
        assert rec.is_file(), tar
        assert tar.with_suffix(".idx").is_file()
        assert hashlib.sha256(tar.read_bytes()).hexdigest() in rec.read_text(), tar
    used = shutil.disk_usage(small_disk).used
    need = float(m.group(2)) * 1e6
    print(f"\nfull disk after {elapsed:.1f} s ({len(tars)} shards written): {lines[0]}")
    # exactly the space the line asked for
    subprocess.run(["mount", "-o", f"remount,size={int((used + need) / 1024) + 1}k", str(small_disk)], check=True)
    res = run(cmd + ["--out", str(out)])
    assert res.returncode == 0, res.stderr
    check_complete(out, clean)


def eio(path: Path) -> None:
    """Make `path` a file whose read fails with a real EIO from the kernel: a symbolic link to
    /proc/self/mem, whose offset 0 (an unmapped address) reads as EIO in every process."""
    tmp = path.with_name(path.name + ".link")
    tmp.symlink_to("/proc/self/mem")
    os.replace(tmp, path)


def test_files_that_vanish_or_turn_unreadable_while_packing(tree: Path, clean: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    gone, broken = src / "val" / "ILSVRC2012_val_00000290.JPEG", src / "val" / "ILSVRC2012_val_00000150.JPEG"
    saved = {p: p.read_bytes() for p in (gone, broken)}
    out = tmp_path / "out"
    proc = subprocess.Popen(packer(src, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while records(out) < 1:  # listed, and packing train: now change the val files under it
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.003)
    gone.unlink()
    eio(broken)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    rejects = {r["source"]: r["reason"] for r in pq.read_table(out / REJECTS_FILE).to_pylist()}
    assert rejects == {
        "val/ILSVRC2012_val_00000290.JPEG": "unreadable: no such file (it vanished after the tree was listed)",
        "val/ILSVRC2012_val_00000150.JPEG": "unreadable: Input/output error (EIO, after 5 tries)",
    }
    assert len(re.findall(r"ILSVRC2012_val_00000150\.JPEG: Input/output error \(EIO\); retry \d of 4", stderr)) == 4
    assert pq.read_table(out / MANIFEST_FILE).num_rows == 2998
    # both readable again: the same command retries exactly those and ends as the clean run
    for path, data in saved.items():
        path.unlink(missing_ok=True)
        path.write_bytes(data)
    res = run(packer(src, out))
    assert res.returncode == 0, res.stderr
    assert "retried 2 inputs an earlier run could not read" in res.stdout
    same_but_source(out, clean)


def same_but_source(out: Path, clean: Path) -> None:
    """`out` (packed from a copy of the tree) equals `clean` byte for byte, but for the source
    path in the settings (.pack/state.json)."""
    ours, theirs = hashes(out), hashes(clean)
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    assert sorted(ours) == sorted(theirs) and differ == [f"{PACK_DIR}/state.json"], differ


def test_a_transient_eio_is_retried_within_the_run(tree: Path, clean: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    flaky = src / "val" / "ILSVRC2012_val_00000007.JPEG"
    data = flaky.read_bytes()
    eio(flaky)
    out = tmp_path / "out"
    proc = subprocess.Popen(packer(src, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # the first retry notice: heal the file while the worker backs off
    assert re.search(r"ILSVRC2012_val_00000007\.JPEG: Input/output error \(EIO\); retry 1 of 4 in 0\.1 s", line), line
    tmp = flaky.with_name("healed.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, flaky)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert pq.read_table(out / REJECTS_FILE).num_rows == 0
    same_but_source(out, clean)
