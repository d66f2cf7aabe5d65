"""A run on a store that keeps the AWS SDK's chunk framing (what s3rver 3.7.1 does): the
command a user types, `python orchestration/train.py`, in a process of its own with the SDK's
defaults. Its storage pre-flight finds the framing, applies the two settings that stop it
(this process and, through Ray's runtime_env, the controller and every worker) and says so;
then every object the run writes reads back as written: checkpoint, metrics, summary, state,
Ray's record and every rank's ledger files. (Before: 8 of 9 objects held the framing and the
run reported its checkpoints saved.) The store is `FramingStore`, a loopback proxy in front
of the tier's moto server; the probe and pack tests: tests/test_shards_store_check.py."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.runs import OUTPUTS, write_config
from helpers.s3_server import FramingStore

from orchestration.checkpoint import FILE, KEYS, load_checkpoint
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import resolve
from shards.store_check import CHECKSUM_SETTINGS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def framing_store(machines, s3_server):
    machines.release()  # one Ray at a time on this machine: the command starts its own
    store = FramingStore(s3_server).start()
    yield store
    store.stop()


def test_a_run_on_a_store_that_keeps_chunk_framing_applies_the_fix_and_every_object_reads_back(
        framing_store, demo_shards, tmp_path, monkeypatch):
    storage = f"s3://{framing_store.new_bucket()}/runs"
    config = write_config(tmp_path, "framed", demo_shards, OUTPUTS, storage_path=storage, epochs=1,
                          audit_samples=True)
    env = {k: v for k, v in os.environ.items() if k not in CHECKSUM_SETTINGS and not k.startswith("RAY_")}
    env.update(framing_store.env())
    done = subprocess.run([sys.executable, "orchestration/train.py", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{storage}: this store keeps the SDK's chunk framing" in done.stdout
    assert all(f"{k}={v}" in done.stdout for k, v in CHECKSUM_SETTINGS.items())
    assert framing_store.framed_bodies >= 1  # the probe's upload went aws-chunked; none after it

    for key, value in CHECKSUM_SETTINGS.items():  # read what the store holds through a client that keeps bytes
        monkeypatch.setenv(key, value)
    run = resolve(f"{storage}/framed")
    summary = json.loads((run / "summary.json").read_bytes())
    assert (summary["epochs"], summary["world_size"]) == (1, 2)
    assert json.loads((run / "state.json").read_bytes())["starts"] == 1
    rows = pq.read_table(pa.BufferReader((run / "metrics.parquet").read_bytes())).to_pylist()
    assert [r["epoch"] for r in rows if r["top1"] is not None] == [1]
    assert ray_checkpoints(run) == ["epoch-0001"]  # Ray's record parses
    json.loads((run / RAY_SNAPSHOT).read_bytes())
    local = tmp_path / FILE
    local.write_bytes((run / "epoch-0001" / FILE).read_bytes())
    assert set(KEYS) <= set(load_checkpoint(local)) and load_checkpoint(local)["epoch"] == 1
    ledger = [f.base_name for f in (run / "samples").list()]
    assert {name.split("-")[1] for name in ledger} == {"r00000", "r00001"}  # both workers' uploads
    for name in ledger:
        table = pq.read_table(io.BytesIO((run / "samples" / name).read_bytes()))
        assert table.num_rows > 0
