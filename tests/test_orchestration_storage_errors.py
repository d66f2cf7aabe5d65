"""The errors a user hits first with shards and runs on an object store (missing bucket,
unreachable endpoint, access denied, no shards) are one line, before Ray starts: real S3
servers (moto, tests/helpers/s3_server.py), no Ray. (A run on S3: tests/e2e/test_s3_run.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestration import train


def tiny_config(tmp_path: Path, storage_path: str, shards: str) -> Path:
    cfg = {"name": "tiny", "storage_path": storage_path, "shards_dir": str(shards), "model": "alexnet-tiny",
           "epochs": 2, "batch_size": 32, "workers": 2, "use_gpu": False, "crop_size": 64}
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
    from helpers.s3_server import S3Server

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


@pytest.mark.parametrize("name", ["state.json", "summary.json", "checkpoint_manager_snapshot.json", "metrics.parquet"])
def test_a_run_file_a_store_changed_is_named_with_the_way_out_before_ray_starts(name, s3_server, s3_bucket,
                                                                               demo_shards, tmp_path, monkeypatch,
                                                                               no_ray):
    """What a store that kept the SDK's chunk framing leaves in a run directory (the object as
    it was sent aws-chunked) stops the re-run in one line naming the object, not a traceback."""
    from helpers.s3_server import FramingStore

    from shards.location import resolve
    from shards.store_check import CHECKSUM_SETTINGS

    for key in CHECKSUM_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    store = FramingStore(s3_server).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
        (resolve(f"{s3_bucket}/runs/tiny") / name).write_bytes(b'{"starts": 1, "elapsed_s": 3.0}\n', verify=False)
    finally:
        store.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the re-run, on a store that keeps bytes
    message = one_line_error(tiny_config(tmp_path, f"{s3_bucket}/runs", demo_shards))
    assert message.startswith(f"error: {s3_bucket}/runs/tiny/{name}: corrupt, not as it was written")
    assert "pick another --set name=" in message and f"delete {s3_bucket}/runs/tiny" in message


def test_what_can_be_checked_before_ray_is_checked_before_ray(demo_shards, tmp_path, no_ray):
    """Workers this machine can never place, an init_from that is not there: one line, Ray
    never started (they used to loop through Ray's retries, or fail in a worker)."""
    import os

    config = tiny_config(tmp_path, str(tmp_path / "runs"), demo_shards)
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(config), "--set", f"workers={cores + 14}"])
    assert str(exc.value) == (f"error: workers: {cores + 14} needs {cores + 14} CPUs (one per worker), this machine "
                              f"has {cores}; lower workers or join a cluster (RAY_ADDRESS)")
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(config), "--set", f"workers=[{cores + 1}, {cores + 4}]"])
    assert f"needs {cores + 1} CPUs" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(config), "--set", "workers=1", "--set", f"init_from={tmp_path / 'nothing'}"])
    assert str(exc.value) == f"error: init_from: {tmp_path / 'nothing'}: no such checkpoint or run directory"
