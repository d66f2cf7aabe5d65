"""`train_worker` in process, without a Ray cluster: Ray Train's local mode runs it here
(tests/helpers/local_train.py), on real DALI (CPU), the real packer's demo_shards (10
classes, 240 train / 50 val) and alexnet-tiny at crop 64. Ranks > 1 are processes of their
own under torchrun, over gloo, as Ray's local mode sets them up. What needs Ray's storage
and restarts (resume, faults, elastic, nodes) is drilled on real clusters in tests/e2e/.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.faults import FailAt
from helpers.local_train import run_local

from orchestration.audit import audit
from orchestration.metrics import COLUMNS
from orchestration.run_book import resizes

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL = 240, 50
SUMMARY_KEYS = {"top1", "top5", "images_per_s", "data_wait", "wall_s", "world_size", "epochs", "restarts",
                "resumed_at", "world_sizes", "skipped_samples"}


def tiny(tmp_path: Path, shards: Path, **values) -> dict:
    return {"name": "tiny", "storage_path": str(tmp_path / "runs"), "shards_dir": str(shards),
            "model": "alexnet-tiny", "epochs": 2, "batch_size": 16, "workers": 1, "use_gpu": False,
            "crop_size": 64, "lr": 0.02, "warmup_epochs": 0.0, "log_every": 2, "audit_samples": True, **values}


def assert_exact_fraction(value: float) -> None:
    """Accuracy over exactly VAL samples is a multiple of 1/VAL."""
    assert abs(value * VAL - round(value * VAL)) < 1e-9, value


def ledger(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "samples").to_pylist()


def test_one_worker_writes_every_output(demo_shards, tmp_path):
    result = run_local(tiny(tmp_path, demo_shards, checkpoint_every_steps=4))
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert (summary["world_size"], summary["epochs"], summary["restarts"], summary["world_sizes"]) == (1, 2, 0, [1])
    assert summary["resumed_at"] == [] and summary["skipped_samples"] == 0
    assert 0 <= summary["top1"] <= summary["top5"] <= 1 and summary["wall_s"] > 0
    assert_exact_fraction(summary["top1"])
    assert_exact_fraction(summary["top5"])
    assert result.metrics["top1"] == summary["top1"]  # the last report: the epoch's figures

    table = pq.read_table(run_dir / "metrics.parquet")
    assert tuple(table.column_names) == COLUMNS
    rows = table.to_pylist()
    epochs = [r for r in rows if r["top1"] is not None]
    steps = [r for r in rows if r["top1"] is None]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [15, 30]  # 240 // 16
    assert [r["step"] for r in steps] == sorted({*range(2, 31, 2), 15})  # every log_every steps, and epoch ends
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["world_size"] == 1 for r in rows)
    assert all(0 <= r["dali_cpu_util"] <= 1.5 and r["mem_anon_mb"] > 100 and r["mem_file_mb"] > 0
               and r["dali_device_mb"] is None and r["nvjpg_util"] is None for r in steps)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = json.loads((run_dir / "state.json").read_text())
    assert state["starts"] == 1 and len(state["attempts"]) == 1 and state["attempts"][0]["first_step_unix"]
    # the ledger, through the audit command: every train sample once per epoch (one worker: no remainder)
    epochs = audit(str(run_dir), shards=str(demo_shards), out=lambda line: None)
    assert [(e.epoch, e.trained, e.duplicates, e.missing, e.extra, e.faults) for e in epochs] == \
        [(1, TRAIN, 0, 0, 0, []), (2, TRAIN, 0, 0, 0, [])]


def test_a_fault_after_a_step_checkpoint_stops_the_worker_with_the_ledger_committed(demo_shards, tmp_path):
    """FailAt raises on the rank right after the checkpoint it names, and only then: what the
    ledger holds is exactly the steps that checkpoint covers."""
    with pytest.raises(RuntimeError, match="injected worker failure after the checkpoint at step 6"):
        run_local(tiny(tmp_path, demo_shards, checkpoint_every_steps=3, epochs=1), callbacks=[FailAt(step=6)])
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted({r["step"] for r in ledger(run_dir)}) == [1, 2, 3, 4, 5, 6]
    assert not (run_dir / "summary.json").exists()
    log = (run_dir / "train.log").read_text()  # the failed start's log is kept, its handler gone
    assert "step 6/" in log and not [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_over_gloo_evaluate_every_val_sample_once(demo_shards, tmp_path, world_size):
    """torchrun starts the ranks; Ray's local mode joins them in a gloo process group. 50 val
    samples over 3 ranks are parts of 16/17/17 in batches of 12: uneven batch counts and short
    last batches, with ten-crop views; evaluate asserts count == 50 inside every rank. The
    gradients are all-reduced in bf16 (the hook registered on gloo too)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(tmp_path, demo_shards, epochs=1, batch_size=12, eval_crop="ten_crop",
                                      grad_compression="bf16", torch_threads=1)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={world_size}", "tests/helpers/local_train.py", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["world_sizes"] == [world_size]
    assert_exact_fraction(summary["top1"])
    assert_exact_fraction(summary["top5"])
    rows = ledger(run_dir)
    steps = TRAIN // (12 * world_size)  # each rank its own part, drop-last
    assert {r["rank"] for r in rows} == set(range(world_size))
    assert len(rows) == len({r["key"] for r in rows}) == steps * 12 * world_size  # disjoint parts
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert all(r["images_per_s_per_worker"] == pytest.approx(r["images_per_s"] / world_size) for r in metrics)


def test_resizes_are_read_off_the_attempts():
    attempts = [{"world_size": 2, "epochs_done": 0, "epoch_samples": 0},
                {"world_size": 1, "epochs_done": 0, "epoch_samples": 96},
                {"world_size": 1, "epochs_done": 1, "epoch_samples": 0},
                {"world_size": 2, "epochs_done": 2, "epoch_samples": 120}]
    assert resizes(attempts, train_size=240) == [(0.4, 2, 1), (2.5, 1, 2)]
