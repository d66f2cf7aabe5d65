"""Training with shards and run on an object store: shards_dir and storage_path s3://... on a
real S3 server (moto, tests/s3_server.py) and a real local Ray, started after the server so
that its workers inherit the AWS variables (as `ray job submit --runtime-env-json
'{"env_vars": ...}'` or the nodes' own environment give them on a cluster).

One 2-worker, 2-epoch run (the demo shards copied into the bucket, staged through a node-local
cache) in which every rank fails once after epoch 1's checkpoint: Ray restarts the worker
group, which resumes from the checkpoint in the bucket. Then the same command again says
"already finished", reading summary.json from the bucket. The errors a user hits first
(missing bucket, unreachable endpoint, access denied, no shards) are one line, before Ray starts.
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
import yaml

from orchestration import train
from orchestration.checkpoint import EXTRA_KEYS, FILE, KEYS
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import resolve

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_config(tmp_path: Path, storage_path: str, shards: str, **values) -> Path:
    cfg = {"name": "tiny", "storage_path": storage_path, "shards_dir": str(shards), "model": "alexnet-bn",
           "epochs": 2, "batch_size": 32, "workers": 2, "use_gpu": False, "crop_size": 64, "lr": 0.02,
           "warmup_epochs": 0.0, "log_every": 2, "max_failures": 0, **values}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if train.main gets as far as starting Ray."""
    def refuse():
        raise AssertionError("train.main started Ray")

    monkeypatch.setattr(train, "start_ray", refuse)


def one_line_error(config: Path) -> str:
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(config)])
    message = str(exc.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_storage_and_shards_errors_are_one_line_before_ray_starts(s3_server, s3_bucket, demo_shards, tmp_path,
                                                                    monkeypatch, no_ray):
    from s3_server import S3Server

    missing = one_line_error(tiny_config(tmp_path, "s3://no-such-bucket-here/runs", demo_shards))
    assert "s3://no-such-bucket-here/runs" in missing and "does not exist" in missing

    empty = one_line_error(tiny_config(tmp_path, f"{s3_bucket}/runs", f"{s3_bucket}/shards"))
    assert f"{s3_bucket}/shards" in empty and "no train/*.tar" in empty

    strict = S3Server(auth=True).start()  # checks credentials and policies: ours are nobody's
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        denied = one_line_error(tiny_config(tmp_path, f"{s3_bucket}/runs", demo_shards))
    finally:
        strict.stop()
    assert f"{s3_bucket}/runs" in denied and ("access denied" in denied or "credentials" in denied)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    unreachable = one_line_error(tiny_config(tmp_path, f"{s3_bucket}/runs", demo_shards))
    assert "cannot reach the storage endpoint" in unreachable and "http://127.0.0.1:9" in unreachable


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=None, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_run(s3_ray, s3_server, demo_shards, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("s3-run")
    bucket = s3_server.new_bucket()
    pafs.copy_files(str(demo_shards), f"{bucket}/shards", destination_filesystem=s3_server.filesystem())
    storage = f"s3://{bucket}/runs"
    config = tiny_config(tmp_path, storage, f"s3://{bucket}/shards", fail_at_epoch=1, max_failures=1,
                         keep_checkpoints=1, cache_dir=str(tmp_path / "cache"))
    assert train.main(["--config", str(config)]) == 0
    return config, f"{storage}/tiny", tmp_path / "cache"


def test_run_on_s3_resumes_from_the_bucket_and_leaves_its_outputs_there(s3_run, tmp_path):
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
