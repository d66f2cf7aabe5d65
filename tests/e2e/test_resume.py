"""Resume at any step, judged by the sample ledger: an uninterrupted run (the `reference`
fixture) and runs interrupted at a step (an injected failure after a step checkpoint, a
SIGKILL of a Ray Train worker mid-epoch, a SIGTERM) must end with the same ledger row for
row and, on CPU with a fixed world size, bit-identical weights. The interrupted run with an
injected failure also shows every output a run writes. Real local Ray (the tier's one),
real DALI (CPU), the demo_shards fixture, the RESUMABLE run of tests/helpers/runs.py (7 steps
per epoch, step checkpoints every 3 steps)."""
from __future__ import annotations

import signal

import pyarrow.parquet as pq
import pytest
from helpers.clusters import LocalRay, kill_a_worker_when
from helpers.faults import FailAt
from helpers.hooks import SignalAt
from helpers.runs import (
    STEPS_PER_EPOCH,
    assert_exact_fraction,
    assert_same_run,
    epoch_rows,
    ledger,
    metrics_rows,
    summary,
    write_config,
)

from orchestration import train
from orchestration.checkpoint import EXTRA_KEYS, FILE, KEYS, load_checkpoint
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import resolve

CHECKPOINT_STEPS = (3, 6, 7, 10, 13, 14)  # RESUMABLE's: every 3 steps of an epoch, and its end
SUMMARY_KEYS = {"top1", "top5", "images_per_s", "data_wait", "wall_s", "world_size", "epochs", "restarts",
                "resumed_at", "world_sizes", "skipped_samples"}
COLUMNS = ["epoch", "step", "loss", "lr", "images_per_s", "data_wait", "top1", "top5", "skipped_samples",
           "world_size", "images_per_s_per_worker", "dali_cpu_util", "mem_anon_mb", "mem_file_mb",
           "dali_device_mb", "nvjpg_util"]


def test_uninterrupted_run_has_a_full_ledger_and_step_checkpoints(reference):
    rows = ledger(reference)
    for epoch in (1, 2):
        keys = [k for e, _, _, k in rows if e == epoch]
        assert len(keys) == len(set(keys)) == STEPS_PER_EPOCH * 32  # no sample twice in an epoch
    done = summary(reference)
    assert done["resumed_at"] == [] and done["skipped_samples"] == 0


@pytest.fixture(scope="module")
def failed_at_step(machines, demo_shards, tmp_path_factory):
    """Every rank raises once right after the step-10 checkpoint (epoch 2 starts at global step
    8: its first step checkpoint is at epoch step 3); Ray Train restarts the group from it."""
    machines.use("local", LocalRay)
    tmp = tmp_path_factory.mktemp("failed")
    path = write_config(tmp, "failed", demo_shards)
    assert train.main(["--config", str(path)], callbacks=[FailAt(step=10)]) == 0
    return path, tmp / "runs" / "failed"


def test_failure_after_a_step_checkpoint_resumes_exactly(failed_at_step, reference):
    _, run_dir = failed_at_step
    done = summary(run_dir)
    assert done["resumed_at"] == [10] and done["restarts"] == 1
    assert_same_run(run_dir, reference)


def test_a_restarted_run_writes_every_output_once(failed_at_step, capsys):
    path, run_dir = failed_at_step
    done = summary(run_dir)
    assert set(done) == SUMMARY_KEYS
    assert 0 <= done["top1"] <= done["top5"] <= 1
    assert_exact_fraction(done["top1"])
    assert_exact_fraction(done["top5"])
    assert done["images_per_s"] > 0 and 0 <= done["data_wait"] <= 1 and done["wall_s"] > 0
    assert (done["world_size"], done["epochs"], done["restarts"]) == (2, 2, 1)
    assert done["skipped_samples"] == 0 and done["world_sizes"] == [2, 2]

    table = pq.read_table(run_dir / "metrics.parquet")
    assert table.column_names == COLUMNS
    rows = table.to_pylist()
    assert [r["epoch"] for r in epoch_rows(run_dir)] == [1, 2]  # one row per epoch despite the restart
    steps = [r for r in rows if r["top1"] is None]
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # log_every 1: each step once
    assert {r["epoch"] for r in steps} == {1, 2} and all(r["top5"] is None for r in steps)
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["lr"] >= 0 for r in steps)
    assert all(r["images_per_s_per_worker"] == pytest.approx(r["images_per_s"] / 2) for r in rows)
    # where the loader's time and memory go: its one DALI thread's CPU share, the host's RSS; no device
    assert all(0 <= r["dali_cpu_util"] <= 1.5 and r["mem_anon_mb"] > 100 and r["mem_file_mb"] > 0
               and r["dali_device_mb"] is None and r["nvjpg_util"] is None for r in steps)
    assert any(r["dali_cpu_util"] > 0 for r in steps), [r["dali_cpu_util"] for r in steps]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / RAY_SNAPSHOT).is_file()
    kept = ["epoch-0001-step-0000013", "epoch-0002"]  # keep_checkpoints=2: the newest two
    assert ray_checkpoints(resolve(run_dir)) == kept
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == kept
    assert [p.name for p in (run_dir / "epoch-0002").iterdir()] == [FILE]  # one complete file, no temp
    state = load_checkpoint(run_dir / "epoch-0002" / FILE)
    assert set(state) == set(KEYS) | set(EXTRA_KEYS) and state["epoch"] == 2 and state["config"]["name"] == "failed"
    assert [r["loader"]["epoch"] for r in state["ranks"]] == [2, 2]
    assert state["position"]["step"] == 2 * STEPS_PER_EPOCH
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped

    # the same command again: says the run is finished, trains nothing, exits 0
    capsys.readouterr()
    assert train.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "top-1" in out and str(run_dir) in out
    assert len(epoch_rows(run_dir)) == 2


@pytest.mark.parametrize("marker,writing", [
    ("epoch-0000-step-0000003", False),  # epoch 1, in the steps after the step-3 checkpoint
    ("epoch-0001-step-0000010", True),  # epoch 2, while the step-10 checkpoint is written
])
def test_sigkill_of_a_worker_mid_epoch_resumes_exactly(local_ray, reference, demo_shards, tmp_path, marker, writing):
    """Wherever the kill lands, the restart resumes from a checkpoint Ray registered (which one
    depends on how far Ray's registration, asynchronous to the steps, had got; a half-copied
    one never) and ends as the reference did."""
    run_dir = tmp_path / "runs" / "killed"
    watcher = kill_a_worker_when(run_dir, marker, writing=writing, delay=0.0 if writing else 0.1)
    assert train.main(["--config", str(write_config(tmp_path, "killed", demo_shards))]) == 0
    watcher.join(5)
    done = summary(run_dir)
    assert done["restarts"] == 1 and done["resumed_at"][0] in CHECKPOINT_STEPS
    assert_same_run(run_dir, reference)


def test_resume_with_another_world_size_continues_the_lr_curve_and_the_epoch(local_ray, reference, demo_shards,
                                                                             tmp_path):
    path = write_config(tmp_path, "reshaped", demo_shards, max_failures=0)
    with pytest.raises(SystemExit, match="re-run the same command"):
        train.main(["--config", str(path)], callbacks=[FailAt(step=10)])
    assert train.main(["--config", str(path), "--set", "workers=1"], callbacks=[FailAt(step=10)]) == 0
    run_dir = tmp_path / "runs" / "reshaped"
    done = summary(run_dir)
    assert done["resumed_at"] == [10] and done["world_size"] == 1
    ref = {r["step"]: r["lr"] for r in metrics_rows(reference) if r["top1"] is None}
    ours = {r["step"]: r["lr"] for r in metrics_rows(run_dir) if r["top1"] is None}
    # the same samples seen in epoch 2 before the step: reference step 10 + j (32 per step) and
    # resumed step 9 + 2j (16 per step, from the 96 of the checkpoint)
    for j in range(1, 4):
        assert ours[9 + 2 * j] == pytest.approx(ref[10 + j], rel=1e-12), j
    assert all(ours[s] == ref[s] for s in range(1, 11))  # the steps before the resume are kept as they were
    # the rest of epoch 2 was resharded onto the one worker: 96 samples at 2 x 16, the other
    # 144 at 1 x 16 (9 steps, none dropped), every one once
    epoch2 = [k for e, _, _, k in ledger(run_dir) if e == 2]
    assert len(epoch2) == len(set(epoch2)) == 240


def test_sigterm_preemption_checkpoints_the_next_step_and_resumes_exactly(local_ray, reference, demo_shards,
                                                                          tmp_path):
    """A worker sent SIGTERM (a spot VM's notice; here rank 1 right after the step-4
    checkpoint) finishes its step; the ranks agree at the next one, write a step checkpoint
    outside the schedule (every 4 steps here) and stop; Ray Train restarts from it."""
    run_dir = tmp_path / "runs" / "preempted"
    path = write_config(tmp_path, "preempted", demo_shards, checkpoint_every_steps=4)
    assert train.main(["--config", str(path)], callbacks=[SignalAt(step=4, sig=signal.SIGTERM)]) == 0
    done = summary(run_dir)
    assert done["restarts"] == 1 and done["resumed_at"] in ([5], [6])  # a step, or the agreement's one more
    assert_same_run(run_dir, reference)
