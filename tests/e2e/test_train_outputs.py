"""Training end to end on the tier's local Ray, real DALI (CPU) and the demo_shards fixture
(10 classes, 240 train / 50 val samples, stored shorter side 64): a job that died re-run by
the same command, and exact evaluation over uneven ranks. (Every output of a run, after a
restart: tests/e2e/test_resume.py.) Runs are the OUTPUTS run of tests/helpers/runs.py:
alexnet-tiny, 2 workers x batch 32 = 3 steps per epoch at crop 64. Checkpoints are Ray
Train's: the run directory holds Ray's record (checkpoint_manager_snapshot.json) and
`epoch-NNNN/checkpoint.pt` folders; tests read the record through Ray's own
`Result.from_path` (orchestration.run_dir.ray_checkpoints).
"""
from __future__ import annotations

import pytest
from helpers.faults import FailAt
from helpers.runs import OUTPUTS, assert_exact_fraction, epoch_rows, metrics_rows, summary, write_config

from orchestration import train
from orchestration.run_dir import ray_checkpoints
from shards.location import resolve


def test_rerun_resumes_a_run_killed_in_its_last_epoch(local_ray, demo_shards, tmp_path):
    """A job that dies in its last epoch (after epoch 1's checkpoint, no restarts allowed)
    leaves Ray's record with epoch 1 and no summary; the same command again (here with one
    worker fewer) resumes from Ray's record: epoch 1 is not trained or logged twice."""
    config = write_config(tmp_path, "tiny", demo_shards, OUTPUTS)
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(SystemExit, match="re-run the same command to resume"):
        train.main(["--config", str(config)], callbacks=[FailAt(epoch=1)])
    assert not (run_dir / "summary.json").exists()
    assert ray_checkpoints(resolve(run_dir)) == ["epoch-0001"]
    epoch1_rows = metrics_rows(run_dir)
    assert {r["epoch"] for r in epoch1_rows} == {1}

    assert train.main(["--config", str(config), "--set", "workers=1"], callbacks=[FailAt(epoch=1)]) == 0
    done = summary(run_dir)
    assert (done["restarts"], done["epochs"], done["world_size"]) == (1, 2, 1)
    assert done["world_sizes"] == [2, 1]
    rows = metrics_rows(run_dir)
    assert rows[: len(epoch1_rows)] == epoch1_rows  # epoch 1 is not trained (or logged) twice
    assert {r["world_size"] for r in rows[len(epoch1_rows):]} == {1} and {r["world_size"] for r in epoch1_rows} == {2}
    assert [r["epoch"] for r in epoch_rows(run_dir)] == [1, 2]
    assert ray_checkpoints(resolve(run_dir)) == ["epoch-0001", "epoch-0002"]


def test_exact_val_denominator_with_three_workers_and_ten_crop(local_ray, demo_shards, tmp_path):
    # 50 val samples over 3 ranks: parts of 16/17/17, batches of 12 -> uneven batch counts
    # and short last batches; evaluate asserts count == 50 inside every worker
    config = write_config(tmp_path, "tiny", demo_shards, OUTPUTS, workers=3, epochs=1, batch_size=12,
                          eval_crop="ten_crop", grad_compression="bf16")  # DDP all-reduces in bf16 (gloo too)
    assert train.main(["--config", str(config)]) == 0
    done = summary(tmp_path / "runs" / "tiny")
    assert done["world_size"] == 3
    assert_exact_fraction(done["top1"])
    assert_exact_fraction(done["top5"])
