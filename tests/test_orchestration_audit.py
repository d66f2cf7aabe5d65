"""`python -m orchestration.audit RUN_DIR`: the sample ledger checked epoch by epoch against
the manifest, with a non-zero exit on duplicates, missing or extra keys. Ledgers written by
the project's own writer (`SampleLedger`) into a run directory, the demo shards' manifest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestration.audit import audit
from orchestration.ledger import SampleLedger
from shards.location import resolve

ROOT = Path(__file__).resolve().parents[1]


def train_keys(shards: Path) -> list[str]:
    rows = pq.read_table(shards / "manifest.parquet", columns=["split", "key"]).to_pylist()
    return [r["key"] for r in rows if r["split"] == "train"]


def write_run(run: Path, epochs: dict[int, list[list[str]]], world: int = 2, batch: int = 16) -> None:
    """A ledger as training writes it: each epoch's per-rank key lists in steps of `batch`."""
    for rank in range(world):
        led = SampleLedger(resolve(run), rank, attempt=0, enabled=True)
        step = 0
        for epoch, parts in sorted(epochs.items()):
            keys = parts[rank]
            for s in range(0, len(keys), batch):
                step += 1
                led.add(epoch, step, keys[s: s + batch])
            led.commit()
    (run / "summary.json").write_text("{}")  # a finished run: every epoch is judged whole


def parts(keys: list[str], world: int = 2, batch: int = 16) -> list[list[str]]:
    """What the loader trains: rank r's part, its full batches only."""
    n = len(keys)
    out = []
    for r in range(world):
        part = keys[r * n // world: (r + 1) * n // world]
        out.append(part[: (n // world) // batch * batch])
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.audit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_a_clean_ledger_passes_and_each_fault_exits_non_zero(demo_shards, tmp_path):
    keys = train_keys(demo_shards)
    good = parts(keys)
    assert sum(map(len, good)) < len(keys)  # the demo's 240 leave a remainder the audit must allow
    clean = tmp_path / "clean"
    write_run(clean, {1: good, 2: parts(keys[::-1])})
    done = run_cli(str(clean), "--shards", str(demo_shards))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("extra: OK") == 2 and "2 epoch(s) audited: OK" in done.stdout

    faulty = {
        "duplicates": [good[0][:-1] + [good[0][0]], good[1]],
        "extra": [good[0][:-1] + ["not-a-key"], good[1]],
        "missing": [good[0][:-16], good[1]],  # a rank's whole batch left out
    }
    for name, bad in faulty.items():
        run = tmp_path / name
        write_run(run, {1: good, 2: bad})
        out = run_cli(str(run), "--shards", str(demo_shards))
        assert out.returncode == 1, (name, out.stdout)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("epoch 2"))
        assert "FAULT" in line and (name if name != "extra" else "not in the manifest") in line, line
        assert next(ln for ln in out.stdout.splitlines() if ln.startswith("epoch 1")).endswith("OK")
        # --epoch: only that epoch is read and judged
        assert run_cli(str(run), "--epoch", "1", "--shards", str(demo_shards)).returncode == 0


def test_an_epoch_the_ledger_lacks_is_named(demo_shards, tmp_path):
    write_run(tmp_path / "run", {1: parts(train_keys(demo_shards))})
    with pytest.raises(ValueError, match="no rows of epoch 3"):
        audit(str(tmp_path / "run"), epoch=3, shards=str(demo_shards), out=lambda line: None)
    out = run_cli(str(tmp_path / "nowhere"), "--shards", str(demo_shards))
    assert out.returncode == 2 and "no sample ledger" in out.stderr
