"""The cluster paths: a 2-node local cluster (`ray.cluster_utils.Cluster`) and `ray job submit`
against a token-authenticated head started by `orchestration/cluster/local-up.sh` (both on
loopback, both stopped by the test). `orchestration/train.py` runs as a script, as users run it.
"""
from __future__ import annotations

import json
import os
import socket
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--set", "epochs=1", "--set", "batch_size=32", "--set", "crop_size=64", "--set", "log_every=2",
         "--set", "max_failures=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run(run_dir: Path, world_size: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["epochs"] == 1
    assert (run_dir / "metrics.parquet").is_file() and (run_dir / "curves.png").is_file()
    return summary


def test_two_node_local_cluster(demo_shards, tmp_path):
    from ray.cluster_utils import Cluster

    # 1 CPU per node and 1 CPU per worker: the two workers can only run on different nodes
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
                                      "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        # Ray rewrites a 127.0.0.1 address to the host's outward IP (where this cluster does not
        # listen) unless its "cluster on this platform" switch is off: off, the driver stays on loopback
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        out = subprocess.run(
            [sys.executable, "orchestration/train.py", "--config", "configs/demo.yaml", *TRAIN,
             "--set", f"shards_dir={demo_shards}", "--set", f"storage_path={tmp_path}", "--set", "name=two-nodes"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        # (Ray Train's node_rank groups workers by IP, and both nodes are 127.0.0.1: the 1-CPU
        # nodes are what put the two 1-CPU workers on two nodes)
        assert "world_rank=1" in out.stdout + out.stderr
        check_run(tmp_path / "two-nodes", world_size=2)
    finally:
        cluster.shutdown()


@pytest.fixture
def token_head(tmp_path):
    """A head from local-up.sh, with its own HOME (token file), ports and state folder."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_DASHBOARD_PORT": str(free_port()),
           "RAY_HEAD_PORT": str(free_port()), "RAY_METRICS_PORT": str(free_port()), "RAY_LOCAL_STATE": str(tmp_path / "cluster"),
           "RAY_STOP_GRACE_S": "5"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    up = subprocess.run(["bash", "orchestration/cluster/local-up.sh", f"--ray-client-server-port={free_port()}",
                         f"--dashboard-agent-listen-port={free_port()}",
                         f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        down = subprocess.run(["bash", "orchestration/cluster/local-down.sh"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


class scrape_while(threading.Thread):
    """Scrape a Prometheus endpoint every half second until `stop` is set: the newest value
    of every ray_alexnet_* sample (by name) and the rank labels seen."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.values: dict[str, list[float]] = {}
        self.ranks: set[str] = set()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("ray_alexnet_"):
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    self.values.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
                    self.ranks.update(re.findall(r'rank="(\d+)"', line))


def test_job_submission_on_a_token_authenticated_head(token_head, demo_shards, tmp_path):
    address = f"http://127.0.0.1:{token_head['RAY_DASHBOARD_PORT']}"
    token = (Path(token_head["HOME"]) / ".ray" / "auth_token").read_text().strip()
    assert token
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token: the job API says no
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    # the README's line, with the README's exports, and the test's tiny settings appended
    env = {**token_head, "RAY_AUTH_MODE": "token", "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    runs = tmp_path / "runs"
    scraped = scrape_while(f"http://127.0.0.1:{token_head['RAY_METRICS_PORT']}/metrics")
    out = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
         "orchestration/train.py", "--config", "configs/demo.yaml", "--set", f"shards_dir={demo_shards}",
         "--set", f"storage_path={runs}", *TRAIN],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    scraped.stop.set()
    scraped.join(10)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    # the training metrics on the head's Prometheus endpoint (ray.util.metrics, Ray's ray_ prefix)
    seen = scraped.values
    for name in ("ray_alexnet_train_images_per_s", "ray_alexnet_train_step_s", "ray_alexnet_train_samples_total",
                 "ray_alexnet_loader_images_per_s", "ray_alexnet_loader_rss_mb"):
        assert max(seen.get(name, [0])) > 0, (name, sorted(seen))
    assert 0 <= min(seen["ray_alexnet_loader_dali_cpu_util"]) <= max(seen["ray_alexnet_loader_dali_cpu_util"]) <= 1.5
    assert "ray_alexnet_loader_device_mb" not in seen  # CPU workers: no device memory to report
    assert 0 <= min(seen["ray_alexnet_train_data_wait"]) <= max(seen["ray_alexnet_train_data_wait"]) <= 1
    for name in ("ray_alexnet_val_top1", "ray_alexnet_val_top5"):
        assert all(0 <= v <= 1 for v in seen[name]), (name, seen.get(name))
    assert {"0", "1"} <= scraped.ranks  # one series per worker
    summary = check_run(runs / yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["name"], world_size=2)
    assert 0 <= summary["top1"] <= 1
