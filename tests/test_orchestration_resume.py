"""Resume at any step, judged by the sample ledger: an uninterrupted run and runs interrupted
at a step (an injected failure after a step checkpoint, a SIGKILL of a Ray Train worker
mid-epoch) must end with the same ledger row for row and, on CPU with a fixed world size,
bit-identical weights. Real local Ray, real DALI (CPU), the demo_shards fixture (240 train
samples: 2 workers x batch 16 = 7 steps per epoch, step checkpoints every 3 steps)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from orchestration import train
from orchestration.checkpoint import FILE, load_checkpoint

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 7


def config(tmp_path: Path, shards: Path, name: str, **values) -> Path:
    cfg = {"name": name, "storage_path": str(tmp_path / "runs"), "shards_dir": str(shards),
           "model": "alexnet-bn", "epochs": 2, "batch_size": 16, "workers": 2, "use_gpu": False,
           "crop_size": 64, "lr": 0.02, "warmup_epochs": 0.5, "schedule": "cosine", "log_every": 1,
           "checkpoint_every_steps": 3, "audit_samples": True, "keep_checkpoints": 2, "max_failures": 1,
           **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ledger(run_dir: Path) -> list[tuple]:
    rows = pq.read_table(run_dir / "samples").to_pylist()
    return sorted((r["epoch"], r["step"], r["rank"], r["key"]) for r in rows)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    newest = sorted(p for p in run_dir.iterdir() if p.name.startswith("epoch-0002") and p.is_dir())[-1]
    assert snapshot
    return load_checkpoint(newest / FILE)["model"]


@pytest.fixture(scope="module")
def reference(local_ray, demo_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    assert train.main(["--config", str(config(tmp, demo_shards, "ref"))]) == 0
    return tmp / "runs" / "ref"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, ref = ledger(run_dir), ledger(reference)
    assert len(ref) == 2 * STEPS_PER_EPOCH * 2 * 16  # every sample of every step, once
    assert ours == ref
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run's: {different[:5]}"


def test_uninterrupted_run_has_a_full_ledger_and_step_checkpoints(reference):
    rows = ledger(reference)
    for epoch in (1, 2):
        keys = [k for e, _, _, k in rows if e == epoch]
        assert len(keys) == len(set(keys)) == STEPS_PER_EPOCH * 32  # no sample twice in an epoch
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["resumed_at"] == [] and summary["skipped_samples"] == 0


def test_failure_after_a_step_checkpoint_resumes_exactly(reference, demo_shards, tmp_path):
    # epoch 2 starts at global step 8: its first step checkpoint is at epoch step 3 = global step 10
    assert train.main(["--config", str(config(tmp_path, demo_shards, "failed", fail_at_step=10))]) == 0
    run_dir = tmp_path / "runs" / "failed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at"] == [10] and summary["restarts"] == 1
    assert_same_run(run_dir, reference)


def ray_train_workers() -> list[int]:
    """Pids of this machine's Ray Train worker processes (Ray titles them ray::RayTrainWorker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def kill_a_worker_when(run_dir: Path, marker: str, timeout: float = 300, sig: int = signal.SIGKILL,
                       delay: float = 0.5, writing: bool = False) -> threading.Thread:
    """In the background: once Ray has registered the checkpoint `marker` (its record names
    it), or with `writing` as soon as its folder appears (Ray is still copying it in), SIGKILL
    one Ray Train worker process, as a node's OOM killer or a crash would."""
    record = run_dir / "checkpoint_manager_snapshot.json"

    def due() -> bool:
        if writing:
            return (run_dir / marker).exists()
        return record.is_file() and marker in record.read_text(errors="replace")

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if due():
                time.sleep(delay)  # into the next steps: the kill lands mid-epoch, between checkpoints
                for pid in ray_train_workers():
                    os.kill(pid, sig)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("marker,writing,resumed", [
    ("epoch-0000-step-0000003", False, (3, 6)),  # epoch 1, between two step checkpoints
    ("epoch-0001-step-0000010", True, (7, 10)),  # epoch 2, while the step-10 checkpoint is written
])
def test_sigkill_of_a_worker_mid_epoch_resumes_exactly(reference, demo_shards, tmp_path, marker, writing, resumed):
    run_dir = tmp_path / "runs" / "killed"
    watcher = kill_a_worker_when(run_dir, marker, writing=writing, delay=0.0 if writing else 0.5)
    assert train.main(["--config", str(config(tmp_path, demo_shards, "killed"))]) == 0
    watcher.join(5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_at"][0] in resumed
    assert_same_run(run_dir, reference)


def test_resume_with_another_world_size_continues_the_lr_curve_and_the_epoch(reference, demo_shards, tmp_path):
    path = config(tmp_path, demo_shards, "reshaped", fail_at_step=10, max_failures=0)
    with pytest.raises(SystemExit, match="re-run the same command"):
        train.main(["--config", str(path)])
    assert train.main(["--config", str(path), "--set", "workers=1"]) == 0
    run_dir = tmp_path / "runs" / "reshaped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at"] == [10] and summary["world_size"] == 1
    ref = {r["step"]: r["lr"] for r in pq.read_table(reference / "metrics.parquet").to_pylist() if r["top1"] is None}
    ours = {r["step"]: r["lr"] for r in pq.read_table(run_dir / "metrics.parquet").to_pylist() if r["top1"] is None}
    # the same samples seen in epoch 2 before the step: reference step 10 + j (32 per step) and
    # resumed step 9 + 2j (16 per step, from the 96 of the checkpoint)
    for j in range(1, 4):
        assert ours[9 + 2 * j] == pytest.approx(ref[10 + j], rel=1e-12), j
    assert all(ours[s] == ref[s] for s in range(1, 11))  # the steps before the resume are kept as they were
    # the rest of epoch 2 was resharded onto the one worker: 96 samples at 2 x 16, the other
    # 144 at 1 x 16 (9 steps, none dropped), every one once
    epoch2 = [k for e, _, _, k in ledger(run_dir) if e == 2]
    assert len(epoch2) == len(set(epoch2)) == 240


def test_sigterm_preemption_checkpoints_the_next_step_and_resumes_exactly(reference, demo_shards, tmp_path):
    """A worker sent SIGTERM (a spot VM's notice) finishes its step; the ranks agree at the
    next one, write a step checkpoint outside the schedule (every 4 steps here) and stop;
    Ray Train restarts from it."""
    run_dir = tmp_path / "runs" / "preempted"
    watcher = kill_a_worker_when(run_dir, "epoch-0000-step-0000004", sig=signal.SIGTERM, delay=0.2)
    path = config(tmp_path, demo_shards, "preempted", checkpoint_every_steps=4)
    assert train.main(["--config", str(path)]) == 0
    watcher.join(5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_at"][0] in (5, 6, 7)  # at most a step or two late
    assert_same_run(run_dir, reference)
