"""Where a run lives: `<storage_path>/<name>/`, a local folder or an object-store prefix
(`s3://bucket/runs/demo`), reached through one `shards.location.Location` (pyarrow.fs).

What is in it:
- ours, written by rank 0, each object complete or absent (`Location.write_bytes`):
  `summary.json` (the run finished), `state.json` (starts, banked training seconds),
  `metrics.parquet`, `curves.png`;
- Ray Train's: `checkpoint_manager_snapshot.json` (its record of the kept checkpoints, what
  `ray.train.get_checkpoint()` hands out on a restart or a re-run) and one folder per kept
  checkpoint, `epoch-NNNN/checkpoint.pt`, uploaded before Ray registers it.

The driver gives Ray the same filesystem (`RunConfig(storage_filesystem=...)`), so Ray's
files and ours resolve once, the same way, from the standard AWS environment.
"""
from __future__ import annotations

import json
from typing import Any

from shards.location import Location, check_reachable, resolve

SUMMARY = "summary.json"
STATE = "state.json"
METRICS = "metrics.parquet"
CURVES = "curves.png"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint record


def run_location(run_dir: str) -> Location:
    """The run directory (`TrainConfig.run_dir`) as a Location."""
    return resolve(run_dir)


def check_storage(storage_path: str) -> None:
    """Fail early, in one line (StorageError), when `storage_path` is a bucket that cannot be
    used: missing, endpoint unreachable, credentials refused or missing, access denied."""
    check_reachable(resolve(storage_path))


def ray_storage(storage_path: str) -> dict[str, Any]:
    """`RunConfig` arguments that put Ray's files under `storage_path` through our resolver:
    the filesystem and the path inside it (Ray wants a prefix-stripped path with a custom fs)."""
    loc = resolve(storage_path)
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def read_json(loc: Location) -> Any | None:
    """The JSON object at `loc`, or None when there is none."""
    try:
        return json.loads(loc.read_text())
    except FileNotFoundError:
        return None


def write_json(loc: Location, obj: Any) -> None:
    loc.write_bytes((json.dumps(obj, indent=2) + "\n").encode())


def read_summary(run: Location) -> dict[str, Any] | None:
    """summary.json (the run finished), or None."""
    return read_json(run / SUMMARY)


def read_state(run: Location) -> dict[str, Any]:
    """state.json: how often the run started and the training seconds banked so far."""
    return read_json(run / STATE) or {"starts": 0, "elapsed_s": 0.0}


def ray_checkpoints(run: Location) -> list[str]:
    """The names of the checkpoint folders Ray's record keeps, oldest first ([] for none):
    read through Ray's own `Result.from_path`, not from a listing of the folder."""
    from ray.train import Result

    if not (run / RAY_SNAPSHOT).is_file():
        return []
    result = Result.from_path(run.path, storage_filesystem=run.fs)
    return [c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints]
