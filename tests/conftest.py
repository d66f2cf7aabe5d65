"""Session-scoped fixtures shared by every stage's tests: a small demo ImageNet tree and its
shards, built once per session by the real packer (no mocks).

- `demo_tree`: 10 classes, 24 train + 5 val images per class, sides 80-160 px, Kaggle layout.
- `demo_shards`: that tree packed at shorter side 64 into ~50 KB shards (several per split:
  240 train and 50 val samples), with index, manifest, rejects, classes and stats.
Treat both as read-only; copy them (`shutil.copytree`) to modify.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shards.demo import write_demo
from shards.pack import build

DEMO_CLASSES = 10
DEMO_TRAIN_PER_CLASS = 24
DEMO_VAL_PER_CLASS = 5


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-imagenet")
    return write_demo(out, classes=DEMO_CLASSES, train_per_class=DEMO_TRAIN_PER_CLASS,
                      val_per_class=DEMO_VAL_PER_CLASS, seed=0, min_side=80, max_side=160, workers=2)


@pytest.fixture(scope="session")
def demo_shards(demo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-shards") / "shards"
    build(demo_tree, out, shorter_side=64, shard_size_mb=0.05, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on 127.0.0.1 for the session (tests/helpers/s3_server.py); the AWS variables
    point at it for this process and every child it starts (packers, Ray workers)."""
    from helpers.s3_server import S3Server

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on the session's S3 server: `s3://<name>`."""
    return f"s3://{s3_server.new_bucket()}"


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray on loopback for one test module (its start-up is the cost); 4
    logical CPUs on this 2-core machine, so that 3 workers (1 CPU each) fit."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=None, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
