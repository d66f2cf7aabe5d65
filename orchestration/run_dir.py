"""Where a run lives: `<storage_path>/<name>/`, a local folder or an object-store prefix
(`s3://bucket/runs/demo`), reached through one `shards.location.Location` (pyarrow.fs).

What is in it:
- ours, written by rank 0, each object complete or absent (`Location.write_bytes`):
  `summary.json` (the run finished), `state.json` (starts, banked training seconds),
  `metrics.parquet`, `curves.png` (each upload's size checked: `Location.check_stored`);
- Ray Train's: `checkpoint_manager_snapshot.json` (its record of the kept checkpoints, what
  `ray.train.get_checkpoint()` hands out on a restart or a re-run) and one folder per kept
  checkpoint, `epoch-NNNN/checkpoint.pt`, uploaded before Ray registers it.

The driver gives Ray the same filesystem (`RunConfig(storage_filesystem=...)`), so Ray's
files and ours resolve once, the same way, from the standard AWS environment.
"""
from __future__ import annotations

import json
from typing import Any

from shards.location import Location, resolve
from shards.store_check import StoreCheck, require

SUMMARY = "summary.json"
STATE = "state.json"
METRICS = "metrics.parquet"
CURVES = "curves.png"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint record


def run_location(run_dir: str) -> Location:
    """The run directory (`TrainConfig.run_dir`) as a Location."""
    return resolve(run_dir)


def check_storage(storage_path: str) -> StoreCheck:
    """Fail early, in one line (StorageError), when `storage_path` cannot be used: a bucket
    missing, endpoint unreachable, credentials refused or missing, access denied, or a store
    that does not keep the bytes written (`shards.store_check`: a store that keeps the SDK's
    chunk framing gets the settings that fix it, for this process; `applied` says so)."""
    return require(resolve(storage_path))


def _way_out(run: Location, what: str) -> str:
    afresh = f"pick another --set name=..., or delete {run.uri} to train the run afresh"
    return f"{what}; or {afresh}" if what else afresh


# Our files and Ray's in a run directory, what each holds if deleted: checked before Ray starts.
_RUN_FILES = {
    STATE: "delete it (the run's start count and banked time restart; checkpoints are kept)",
    SUMMARY: "delete it to train the run again",
    RAY_SNAPSHOT: "",  # Ray Train's record of the checkpoints: the run cannot resume without it
}


def check_run_files(run: Location) -> None:
    """CorruptFile, one line naming the file and the way out, when a file of an earlier start
    of this run does not parse (a store that changed bytes, a hand edit); never a traceback
    from Ray's controller or a worker later on."""
    for name, what in _RUN_FILES.items():
        if (run / name).is_file():
            (run / name).read_json(_way_out(run, what))
    if (run / METRICS).is_file():
        from orchestration.metrics import read_metrics

        read_metrics(run / METRICS, _way_out(run, "delete it (the curves restart from the next epoch)"))


def ray_storage(storage_path: str) -> dict[str, Any]:
    """`RunConfig` arguments that put Ray's files under `storage_path` through our resolver:
    the filesystem and the path inside it (Ray wants a prefix-stripped path with a custom fs)."""
    loc = resolve(storage_path)
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def read_json(loc: Location) -> Any | None:
    """The JSON object at `loc`, or None when there is none (CorruptFile naming it when it
    does not parse)."""
    try:
        return loc.read_json(_way_out(resolve(loc.parent_uri), _RUN_FILES.get(loc.name, "delete it")))
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
