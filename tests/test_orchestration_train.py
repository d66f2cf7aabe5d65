"""Training end to end on a real local Ray, real DALI (CPU) and the demo_shards fixture
(10 classes, 240 train / 50 val samples, stored shorter side 64).

One embedded Ray serves every case in this module (its start-up is the cost); runs are a
couple of epochs of a few steps at crop 64. Checkpoints are Ray Train's: the run directory
holds Ray's record (checkpoint_manager_snapshot.json) and `epoch-NNNN/checkpoint.pt` folders;
tests read the record through Ray's own `Result.from_path` (orchestration.run_dir.ray_checkpoints).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from orchestration import train
from orchestration.checkpoint import EXTRA_KEYS, FILE, KEYS, load_checkpoint
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import resolve

pytestmark = pytest.mark.slow

VAL_SIZE = 50
SUMMARY_KEYS = {"top1", "top5", "images_per_s", "data_wait", "wall_s", "world_size", "epochs", "restarts",
                "resumed_at", "world_sizes", "skipped_samples"}
COLUMNS = ["epoch", "step", "loss", "lr", "images_per_s", "data_wait", "top1", "top5", "skipped_samples",
           "world_size", "images_per_s_per_worker", "dali_cpu_util", "rss_mb", "dali_device_mb"]


def tiny_config(tmp_path: Path, shards: Path, **values) -> Path:
    cfg = {"name": "tiny", "storage_path": str(tmp_path / "runs"), "shards_dir": str(shards),
           "model": "alexnet-bn", "epochs": 2, "batch_size": 32, "workers": 2, "use_gpu": False,
           "crop_size": 64, "lr": 0.02, "warmup_epochs": 0.0, "log_every": 2, "max_failures": 0, **values}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def epoch_rows(run_dir: Path) -> list[dict]:
    return [r for r in pq.read_table(run_dir / "metrics.parquet").to_pylist() if r["top1"] is not None]


def assert_exact_fraction(value: float) -> None:
    """Accuracy over exactly VAL_SIZE samples is a multiple of 1/VAL_SIZE."""
    assert abs(value * VAL_SIZE - round(value * VAL_SIZE)) < 1e-9, value


@pytest.fixture(scope="module")
def failed_once_run(local_ray, demo_shards, tmp_path_factory):
    """A 2-worker, 2-epoch run in which rank 0 raises once after epoch 1's checkpoint:
    FailureConfig restarts the worker group, which resumes from that checkpoint."""
    tmp_path = tmp_path_factory.mktemp("failed-once")
    config = tiny_config(tmp_path, demo_shards, fail_at_epoch=1, max_failures=1)
    assert train.main(["--config", str(config)]) == 0
    return config, tmp_path / "runs" / "tiny"


def test_two_workers_every_output_and_resume_after_worker_failure(failed_once_run, capsys):
    config, run_dir = failed_once_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert 0 <= summary["top1"] <= summary["top5"] <= 1
    assert_exact_fraction(summary["top1"])
    assert_exact_fraction(summary["top5"])
    assert summary["images_per_s"] > 0 and 0 <= summary["data_wait"] <= 1 and summary["wall_s"] > 0
    assert (summary["world_size"], summary["epochs"], summary["restarts"]) == (2, 2, 1)
    assert summary["resumed_at"] == [3] and summary["skipped_samples"] == 0  # from epoch 1's end (3 steps)
    assert summary["world_sizes"] == [2, 2]

    table = pq.read_table(run_dir / "metrics.parquet")
    assert table.column_names == COLUMNS
    rows = table.to_pylist()
    assert [r["epoch"] for r in epoch_rows(run_dir)] == [1, 2]  # one row per epoch despite the restart
    steps = [r for r in rows if r["top1"] is None]
    assert {r["epoch"] for r in steps} == {1, 2} and all(r["top5"] is None for r in steps)
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["lr"] >= 0 for r in steps)
    assert all(r["images_per_s_per_worker"] == pytest.approx(r["images_per_s"] / 2) for r in rows)
    # where the loader's time and memory go: its one DALI thread's CPU share, the host's RSS; no device
    assert all(0 <= r["dali_cpu_util"] <= 1.5 and r["rss_mb"] > 100 and r["dali_device_mb"] is None for r in steps)
    assert any(r["dali_cpu_util"] > 0 for r in steps), [r["dali_cpu_util"] for r in steps]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / RAY_SNAPSHOT).is_file()
    assert ray_checkpoints(resolve(run_dir)) == ["epoch-0001", "epoch-0002"]  # keep_checkpoints=2
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]
    assert [p.name for p in (run_dir / "epoch-0002").iterdir()] == [FILE]  # one complete file, no temp
    state = load_checkpoint(run_dir / "epoch-0002" / FILE)
    assert set(state) == set(KEYS) | set(EXTRA_KEYS) and state["epoch"] == 2 and state["config"]["name"] == "tiny"
    assert [r["loader"]["epoch"] for r in state["ranks"]] == [2, 2] and state["position"]["step"] == 2 * 3
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped

    # the same command again: says the run is finished, trains nothing, exits 0
    capsys.readouterr()
    assert train.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "top-1" in out and str(run_dir) in out
    assert len(epoch_rows(run_dir)) == 2


def test_rerun_resumes_a_run_killed_in_its_last_epoch(local_ray, demo_shards, tmp_path):
    """A job that dies in its last epoch (after epoch 1's checkpoint, no restarts allowed)
    leaves Ray's record with epoch 1 and no summary; the same command again (here with one
    worker fewer) resumes from Ray's record: epoch 1 is not trained or logged twice."""
    config = tiny_config(tmp_path, demo_shards, fail_at_epoch=1, max_failures=0)
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(SystemExit, match="re-run the same command to resume"):
        train.main(["--config", str(config)])
    assert not (run_dir / "summary.json").exists()
    assert ray_checkpoints(resolve(run_dir)) == ["epoch-0001"]
    epoch1_rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert {r["epoch"] for r in epoch1_rows} == {1}

    config = tiny_config(tmp_path, demo_shards, fail_at_epoch=1, max_failures=0, workers=1)
    assert train.main(["--config", str(config)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["restarts"], summary["epochs"], summary["world_size"]) == (1, 2, 1)
    assert summary["world_sizes"] == [2, 1]
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert rows[: len(epoch1_rows)] == epoch1_rows  # epoch 1 is not trained (or logged) twice
    assert {r["world_size"] for r in rows[len(epoch1_rows):]} == {1} and {r["world_size"] for r in epoch1_rows} == {2}
    assert [r["epoch"] for r in epoch_rows(run_dir)] == [1, 2]
    assert ray_checkpoints(resolve(run_dir)) == ["epoch-0001", "epoch-0002"]


def test_exact_val_denominator_with_three_workers_and_ten_crop(local_ray, demo_shards, tmp_path):
    # 50 val samples over 3 ranks: parts of 16/17/17, batches of 12 -> uneven batch counts
    # and short last batches; evaluate asserts count == 50 inside every worker
    config = tiny_config(tmp_path, demo_shards, workers=3, epochs=1, batch_size=12, eval_crop="ten_crop",
                         grad_compression="bf16")  # DDP all-reduces in bf16 (registered on gloo too)
    assert train.main(["--config", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["world_size"] == 3
    assert_exact_fraction(summary["top1"])
    assert_exact_fraction(summary["top5"])
