"""Training with shards and run on an object store: shards_dir and storage_path s3://... on a
real S3 server (moto, tests/helpers/s3_server.py) and the tier's local Ray, started after the server so
that its workers inherit the AWS variables (as `ray job submit --runtime-env-json
'{"env_vars": ...}'` or the nodes' own environment give them on a cluster).

One 2-worker, 2-epoch run (the demo shards copied into the bucket, staged through a node-local
cache) in which every rank fails once after epoch 1's checkpoint: Ray restarts the worker
group, which resumes from the checkpoint in the bucket. Then the same command again says
"already finished", reading summary.json from the bucket. (The errors a user hits first, one
line before Ray starts: tests/test_orchestration_storage_errors.py, no Ray.)
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from helpers.clusters import LocalRay
from helpers.faults import FailAt
from helpers.runs import OUTPUTS, write_config

from orchestration import train
from orchestration.checkpoint import EXTRA_KEYS, FILE, KEYS
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import resolve

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if train.main gets as far as starting Ray."""
    def refuse():
        raise AssertionError("train.main started Ray")

    monkeypatch.setattr(train, "start_ray", refuse)


@pytest.fixture(scope="module")
def s3_run(machines, s3_server, demo_shards, tmp_path_factory):
    """The tier's local Ray (started after the S3 server: its workers have the AWS variables)."""
    machines.use("local", LocalRay)
    tmp_path = tmp_path_factory.mktemp("s3-run")
    bucket = s3_server.new_bucket()
    pafs.copy_files(str(demo_shards), f"{bucket}/shards", destination_filesystem=s3_server.filesystem())
    storage = f"s3://{bucket}/runs"
    config = write_config(tmp_path, "tiny", f"s3://{bucket}/shards", OUTPUTS, storage_path=storage, max_failures=1,
                          keep_checkpoints=1, cache_dir=str(tmp_path / "cache"))
    assert train.main(["--config", str(config)], callbacks=[FailAt(epoch=1)]) == 0
    return config, f"{storage}/tiny", tmp_path / "cache"


def test_run_on_s3_resumes_from_the_bucket_and_leaves_its_outputs_there(s3_run):
    config, run_uri, cache = s3_run
    assert any(p.suffix == ".tar" for p in cache.rglob("*"))  # the shards came through the node-local cache
    run = resolve(run_uri)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs"], summary["restarts"]) == (2, 2, 1)
    assert json.loads((run / "state.json").read_text())["starts"] == 2
    rows = pq.read_table(pa.BufferReader((run / "metrics.parquet").read_bytes())).to_pylist()
    assert [r["epoch"] for r in rows if r["top1"] is not None] == [1, 2]  # epoch 1 once, despite the restart
    assert (run / "curves.png").read_bytes()[:8] == PNG

    # Ray's record in the bucket: keep_checkpoints=1 left only the newest checkpoint
    assert (run / RAY_SNAPSHOT).is_file()
    assert ray_checkpoints(run) == ["epoch-0002"]
    assert [f.base_name for f in run.list() if f.base_name.startswith("epoch-")] == ["epoch-0002"]
    assert [f.base_name for f in (run / "epoch-0002").list()] == [FILE]
    with run.fs.open_input_file((run / "epoch-0002" / FILE).path) as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    assert set(state) == set(KEYS) | set(EXTRA_KEYS) and state["epoch"] == 2 and state["config"]["storage_path"].startswith("s3://")
    assert not (Path.cwd() / "s3:").exists() and not os.path.exists("s3:")  # no local copy of the URI


def test_the_same_command_again_says_already_finished_from_the_bucket(s3_run, capsys, no_ray):
    config, run_uri, _ = s3_run
    capsys.readouterr()
    assert train.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and run_uri in out and "top-1" in out
