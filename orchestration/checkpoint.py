"""Checkpoints through Ray Train: fixed keys, one complete file, loaded with `weights_only=True`.

Saving (`report`): every rank calls `ray.train.report` (a barrier); rank 0 alone passes a
`Checkpoint.from_directory` of a local temp folder holding `checkpoint.pt` (written under a
temp name, fsynced, renamed). Ray uploads the folder to `<run_dir>/epoch-NNNN/` on the run's
storage (a path or `s3://...`) and registers it in its record only after the upload
completed; `CheckpointConfig(num_to_keep=...)` prunes the old ones.

Resuming (`restore`): `ray.train.get_checkpoint()` is the newest registered checkpoint,
the same one for every rank, after a worker-group restart and on a re-run of the same
storage_path and name (Ray reloads its record from the run directory); `epoch` inside is
the number of epochs completed.

A full disk (`StorageFull`, ENOSPC): on a local storage_path rank 0 checks the free space
before Ray copies a checkpoint in, and `restore` checks it for the next one before training
on; a copy that fails anyway (another writer took the space, no inodes left) is removed, so
the storage never keeps half a checkpoint. Ray registers only completed copies, so the ones
before stay loadable; the driver prints `failure_line`.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from orchestration.config import from_dict
from orchestration.distributed import unwrap
from orchestration.run_dir import ray_checkpoints, run_location
from shards.location import Location, StorageError, corrupt_file

KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "config")
# Step checkpoints add where the run stands and every rank's own state (resume.py).
EXTRA_KEYS = ("position", "ranks")
FILE = "checkpoint.pt"

log = logging.getLogger("train")

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[errno (28|122)\]", re.I)


class StorageFull(Exception):
    """A checkpoint that does not fit on the run's storage, in one line: where, how much is
    needed and free, what became of the copy. Raised on a worker; pickles through Ray."""


def rng_state() -> dict[str, Any]:
    """Every RNG training draws from in this process: torch CPU (dropout on CPU), CUDA (dropout
    on the GPU, all devices), Python's. numpy's is not used by training."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dir_name(epoch: int, step: int | None = None) -> str:
    """The checkpoint's folder under the run directory: `epoch-NNNN` after an epoch, or
    `epoch-NNNN-step-NNNNNNN` inside one (NNNN: the epochs completed, then the global step)."""
    return f"epoch-{epoch:04d}" if step is None else f"epoch-{epoch:04d}-step-{step:07d}"


def write_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, epoch: int, config: dict[str, Any], **extra: Any) -> Path:
    """Write `folder/checkpoint.pt` with the fixed keys: a temp name, fsync, then rename, so
    the folder never holds half a checkpoint under the final name."""
    final = Path(folder) / FILE
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "config": config,
        **{k: extra[k] for k in EXTRA_KEYS if k in extra},
    }
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint file (weights_only=True) and check it has the fixed keys (and at
    most the step checkpoint's extra ones)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not set(KEYS) <= set(state) <= set(KEYS) | set(EXTRA_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a training checkpoint (keys {got}, expected {list(KEYS)})")
    return state


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _statvfs(path: str | Path) -> os.statvfs_result:
    """The filesystem of a local path (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.statvfs(p)


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of a local path."""
    st = _statvfs(path)
    return st.f_bavail * st.f_frsize


def free_text(path: str | Path) -> str:
    """`N MB free`, and the files still free when a filesystem is nearly out of inodes."""
    st = _statvfs(path)
    inodes = f", inodes for {st.f_favail} more file(s)" if st.f_files and st.f_favail < 1000 else ""
    return f"{_mb(st.f_bavail * st.f_frsize)} free{inodes}"


def check_room(folder: str | Path, need: int, what: str, after: str) -> None:
    """StorageFull unless the local `folder` has `need` bytes free for `what`."""
    if free_bytes(folder) < need:
        raise StorageFull(f"{folder}: No space left on device (ENOSPC) for {what}: {_mb(need)} needed, "
                          f"{free_text(folder)}; {after}")


def is_full(err: BaseException) -> bool:
    """An OSError of a full disk or quota (ENOSPC, EDQUOT), by errno or pyarrow's text."""
    return isinstance(err, OSError) and (err.errno in FULL_ERRNOS or bool(_FULL_TEXT.search(str(err))))


def _upload(metrics: dict[str, Any], checkpoint: Any, name: str, run: Location | None, size: int) -> None:
    """`ray.train.report` with rank 0's checkpoint; a copy that ran out of space is removed
    from storage (Ray registers a checkpoint only after its copy completed, so this one is
    in no record) and the failure becomes StorageFull."""
    import ray.train

    try:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    except OSError as err:
        if checkpoint is None or not is_full(err):
            raise
        try:
            run.fs.delete_dir((run / name).path)
            removed = "the partial copy was removed"
        except FileNotFoundError:
            removed = "nothing of it was left"
        except OSError as gone:
            removed = f"the partial copy could not be removed ({' '.join(str(gone).split())[:120]}): delete it"
        free = f", {free_text(run.path)}" if not run.remote else ""
        raise StorageFull(f"{run}: No space left on device (ENOSPC) while Ray Train copied checkpoint {name} "
                          f"({_mb(size)}{free}) there; {removed}") from err


def report(metrics: dict[str, Any], *, rank: int, save: bool, model: nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, config: dict[str, Any],
           step: int | None = None, **extra: Any) -> None:
    """`ray.train.report(metrics)` on every rank; with `save`, rank 0 attaches the checkpoint
    of `epoch` (returns once Ray has uploaded it: CheckpointUploadMode.SYNC)."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    name = dir_name(epoch, step)
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-") as tmp:
        checkpoint, run, size = None, None, 0
        if rank == 0:
            t0 = time.perf_counter()
            path = write_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                    config=config, **extra)
            size, t_write = path.stat().st_size, time.perf_counter() - t0
            run = run_location(from_dict(config).run_dir)
            if not run.remote:  # before Ray's copy: a full disk is never filled up with half a checkpoint
                check_room(run.path, size, f"checkpoint {name}", "nothing of it was written")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        t1 = time.perf_counter()
        _upload(metrics, checkpoint, name, run, size)
        if rank == 0 and run.remote:  # never logged as saved when the store holds other bytes
            (run / name / FILE).check_stored(size)
        if rank == 0:
            log.info("checkpoint %s: %.1f MB, written in %.2fs, reported in %.2fs (upload and barrier)",
                     name, size / 2**20, t_write, time.perf_counter() - t1)


def restore() -> dict[str, Any] | None:
    """The newest checkpoint Ray registered for this run (the same for every rank), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):  # the next one needs as much room
        info = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{FILE}")
        if info.type == pafs.FileType.File:
            check_room(Path(checkpoint.path).parent, info.size, f"the checkpoints after {name}",
                       "stopped before training on")
    t0 = time.perf_counter()
    where = f"{checkpoint.path.rstrip('/')}/{FILE}"
    if not isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        where = f"{checkpoint.filesystem.type_name}://{where}"
    with checkpoint.as_directory() as folder:  # remote: downloaded once per node, then removed
        try:
            state = load_checkpoint(Path(folder) / FILE)
        except (RuntimeError, ValueError, EOFError, OSError) as err:  # torch.load of changed bytes
            raise corrupt_file(where, err, "Ray's newest checkpoint of this run cannot be loaded; delete its "
                               "folder and Ray's record, or start another --set name=...") from None
    log.info("checkpoint %s loaded in %.2fs", name, time.perf_counter() - t0)
    return state


def _causes(err: BaseException):
    """`err`, then what it wraps: a WorkerGroupError's per-rank failures (by rank), a
    ControllerError's failure, and each one's __cause__/__context__ chain."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None) or {}
        todo.extend(failures[r] for r in sorted(failures))
        todo.extend([getattr(e, "controller_failure", None), e.__cause__, e.__context__])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def failure_line(err: BaseException, run: Location) -> str:
    """The driver's one line (after "error: ") for a run that Ray Train gave up on: a full
    storage says where, how much, what was kept and what to do; anything else names the first
    failing rank's exception. Both say that re-running the same command resumes."""
    causes = list(_causes(err))
    full = next((e for e in causes if isinstance(e, StorageFull)), None)
    disk = next((e for e in causes if is_full(e)), None)
    if full is None and disk is None:
        failures = getattr(err, "worker_failures", None) or {}
        inner = getattr(err, "controller_failure", None)
        first = failures[min(failures)] if failures else inner
        if failures:
            what = f"rank {min(failures)}: {type(first).__name__}: {_first_line(first)}"
        else:
            what = f"{type(inner).__name__}: {_first_line(inner)}" if inner is not None else _first_line(err)
        if isinstance(first, (ValueError, StorageError)):  # a setting or a store to fix: not a passing fault
            return (f"training failed ({what[:300]}); fix what it names first: then the same command resumes "
                    f"from the newest checkpoint Ray registered in {run}")
        return (f"training failed ({what[:300]}); re-run the same command to resume from the newest "
                f"checkpoint Ray registered in {run}")
    try:
        kept = ray_checkpoints(run)
    except Exception:  # the line must come out even if Ray's record cannot be read
        kept = []
    kept_line = (f"Ray's registered checkpoints are complete and kept (newest: {kept[-1]})" if kept
                 else "No checkpoint was registered yet")
    resume = f"it resumes from {kept[-1]}" if kept else "it starts from the beginning"
    head = (f"checkpoint storage full: {full}" if full is not None
            else f"storage full: {run}: {_first_line(disk)[:300]}")
    return (f"{head}. {kept_line}. Free space there or enlarge the disk (room for keep_checkpoints + 1 "
            f"checkpoints: a new one is written before the oldest is deleted), then re-run the same command: {resume}")
