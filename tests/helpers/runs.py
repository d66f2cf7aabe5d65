"""Small training runs for the e2e drills and what they are judged by.

Every run trains `alexnet-tiny` (alexnet-bn at 1/16 width: the same layers and code paths,
KB-sized checkpoints) on the demo_shards fixture (240 train / 50 val samples) at crop 64.
`RESUMABLE` is the run the resume drills compare: 2 workers x batch 16 = 7 steps per epoch,
2 epochs, a step checkpoint every 3 steps, the sample ledger on, one torch thread per worker
(so a run on a local Ray and one on a multi-node cluster compute the same weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from orchestration.checkpoint import FILE, load_checkpoint

MODEL = "alexnet-tiny"
TRAIN_SIZE, VAL_SIZE = 240, 50
STEPS_PER_EPOCH = 7  # RESUMABLE: 240 samples / (2 workers x batch 16), the remainder dropped
RESUMABLE = {"model": MODEL, "epochs": 2, "batch_size": 16, "workers": 2, "use_gpu": False, "crop_size": 64,
             "lr": 0.02, "warmup_epochs": 0.5, "schedule": "cosine", "log_every": 1, "checkpoint_every_steps": 3,
             "audit_samples": True, "keep_checkpoints": 2, "max_failures": 1, "torch_threads": 1}
# the outputs drills: 2 workers x batch 32 = 3 steps per epoch, epoch-end checkpoints only
OUTPUTS = {"model": MODEL, "epochs": 2, "batch_size": 32, "workers": 2, "use_gpu": False, "crop_size": 64,
           "lr": 0.02, "warmup_epochs": 0.0, "log_every": 2, "max_failures": 0}


def write_config(tmp: Path, name: str, shards, base: dict = RESUMABLE, storage_path: str | None = None,
                 **values) -> Path:
    """`tmp/<name>.yaml`: `base` with `values`, the run `<storage_path or tmp/runs>/<name>`."""
    cfg = {**base, "name": name, "storage_path": storage_path or str(tmp / "runs"), "shards_dir": str(shards),
           **values}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def epoch_rows(run_dir: Path) -> list[dict]:
    """The per-epoch rows of metrics.parquet (those with val figures)."""
    return [r for r in metrics_rows(run_dir) if r["top1"] is not None]


def assert_exact_fraction(value: float) -> None:
    """Accuracy over exactly VAL_SIZE samples is a multiple of 1/VAL_SIZE."""
    assert abs(value * VAL_SIZE - round(value * VAL_SIZE)) < 1e-9, value


def ledger(run_dir: Path) -> list[tuple]:
    """The sample ledger, sorted: (epoch, step, rank, key) per sample per step trained on."""
    rows = pq.read_table(run_dir / "samples").to_pylist()
    return sorted((r["epoch"], r["step"], r["rank"], r["key"]) for r in rows)


def final_weights(run_dir: Path, epochs: int = 2) -> dict[str, torch.Tensor]:
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()  # Ray's record
    return load_checkpoint(run_dir / f"epoch-{epochs:04d}" / FILE)["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The interrupted RESUMABLE run ended with the uninterrupted one's ledger row for row and
    bit-identical weights."""
    ours, ref = ledger(run_dir), ledger(reference)
    assert len(ref) == 2 * STEPS_PER_EPOCH * 2 * 16  # every sample of every step, once
    assert ours == ref
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run's: {different[:5]}"
