"""The cluster path users take: `ray job submit` of configs/demo.yaml against a
token-authenticated head started by `orchestration/cluster/local-up.sh` (as `make
cluster-up`; on loopback, stopped by the tier), and the training metrics on the head's
Prometheus endpoint. (A run on a multi-node cluster, one worker per node:
test_nodes.py.) The demo trains alexnet-tiny here, one epoch at crop 64.
"""
from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from helpers.clusters import ROOT, scrape_while
from helpers.runs import MODEL, summary

TRAIN = ["--set", f"model={MODEL}", "--set", "epochs=1", "--set", "batch_size=32", "--set", "crop_size=64",
         "--set", "log_every=2", "--set", "max_failures=0"]
SERIES = ("ray_alexnet_train_images_per_s", "ray_alexnet_train_step_s", "ray_alexnet_train_samples_total",
          "ray_alexnet_loader_images_per_s", "ray_alexnet_loader_mem_anon_mb", "ray_alexnet_loader_mem_file_mb",
          "ray_alexnet_loader_dali_cpu_util",
          "ray_alexnet_train_data_wait", "ray_alexnet_val_top1", "ray_alexnet_val_top5")


def test_job_submission_on_a_token_authenticated_head(token_head, demo_shards, tmp_path):
    assert token_head.token
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token: the job API says no
        urllib.request.urlopen(f"{token_head.address}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    # the README's line, with the README's exports, and the test's tiny settings appended
    runs = tmp_path / "runs"
    scraped = scrape_while(token_head.metrics_url)
    out = subprocess.run(
        ["ray", "job", "submit", "--address", token_head.address, "--working-dir", ".", "--", "python",
         "orchestration/train.py", "--config", "configs/demo.yaml", "--set", f"shards_dir={demo_shards}",
         "--set", f"storage_path={runs}", *TRAIN],
        cwd=ROOT, env=token_head.client_env(), capture_output=True, text=True, timeout=400)
    deadline = time.monotonic() + 30  # the last exports of the workers' gauges may trail the job's end
    while not all(name in scraped.values for name in SERIES) and time.monotonic() < deadline:
        time.sleep(0.5)
    scraped.stop.set()
    scraped.join(10)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    # the training metrics on the head's Prometheus endpoint (ray.util.metrics, Ray's ray_ prefix)
    seen = scraped.values
    for name in ("ray_alexnet_train_images_per_s", "ray_alexnet_train_step_s", "ray_alexnet_train_samples_total",
                 "ray_alexnet_loader_images_per_s", "ray_alexnet_loader_mem_anon_mb",
                 "ray_alexnet_loader_mem_file_mb"):
        assert max(seen.get(name, [0])) > 0, (name, sorted(seen))
    assert 0 <= min(seen["ray_alexnet_loader_dali_cpu_util"]) <= max(seen["ray_alexnet_loader_dali_cpu_util"]) <= 1.5
    assert "ray_alexnet_loader_device_mb" not in seen  # CPU workers: no device memory to report
    assert 0 <= min(seen["ray_alexnet_train_data_wait"]) <= max(seen["ray_alexnet_train_data_wait"]) <= 1
    for name in ("ray_alexnet_val_top1", "ray_alexnet_val_top5"):
        assert all(0 <= v <= 1 for v in seen[name]), (name, seen.get(name))
    assert {"0", "1"} <= scraped.ranks  # one series per worker
    run_dir = runs / yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["name"]
    done = summary(run_dir)
    assert done["world_size"] == 2 and done["epochs"] == 1 and 0 <= done["top1"] <= 1
    assert (run_dir / "metrics.parquet").is_file() and (run_dir / "curves.png").is_file()
