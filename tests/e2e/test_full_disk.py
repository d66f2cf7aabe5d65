"""A checkpoint that hits a full disk during training (issue 16, "Full disk"): the run stops
with one line saying the storage is full, where, how much was needed and free, and what to
do; the checkpoint registered before it stays complete and loadable, nothing half-written is
left on the storage, and once space is freed the same command resumes from the kept one.

The tier's local Ray, real DALI (CPU), a real tmpfs as storage_path (mounted by the test:
root or CAP_SYS_ADMIN, skipped with the reason elsewhere), the demo_shards fixture (7 steps
per epoch on 2 workers, alexnet-tiny). Once the epoch-1 checkpoint is registered, another
job's file takes the disk down to half a checkpoint (tests/helpers/hooks.py FillDisk), so
the epoch-2 one does not fit, whatever a checkpoint weighs. (failure_line on Ray's errors
without Ray: tests/test_orchestration_failure_line.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.hooks import FillDisk
from helpers.runs import write_config

from orchestration import train
from orchestration.checkpoint import FILE, failure_line, load_checkpoint
from orchestration.config import load_config
from orchestration.run_dir import ray_checkpoints, ray_storage
from shards.location import resolve

DISK_MB = 64  # the tmpfs lives in memory


def config(tmp_path: Path, shards: Path, name: str, **values) -> Path:
    """The resume drills' small run, with checkpoints at epoch ends only."""
    return write_config(tmp_path, name, shards, **{"checkpoint_every_steps": 0, **values})


@contextmanager
def tmpfs(where: Path, size_mb: int, inodes: int | None = None):
    """A real small filesystem at `where` for the test's duration."""
    where.mkdir()
    options = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip() or done.returncode
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # a Ray process still holds a file


class LowestFree(threading.Thread):
    """In the background until `stop` is set: the least free space seen on `disk` (`free`),
    sampled every 5 ms."""

    def __init__(self, disk: Path):
        super().__init__(daemon=True)
        self.disk, self.stop, self.free = disk, threading.Event(), shutil.disk_usage(disk).free
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.free = min(self.free, shutil.disk_usage(self.disk).free)


def checkpoint_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("epoch-"))


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_resumes_once_space_is_freed(
        local_ray, demo_shards, tmp_path):
    with tmpfs(tmp_path / "disk", DISK_MB) as disk:
        other = disk / "other-job" / "scratch.bin"
        path = config(tmp_path, demo_shards, "full", storage_path=str(disk / "runs"))
        run_dir = disk / "runs" / "full"

        low = LowestFree(disk)
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as stopped:
            train.main(["--config", str(path)], callbacks=[FillDisk(str(run_dir), str(other), epoch=1, leave=0.5)])
        low.stop.set()
        size = (run_dir / "epoch-0001" / FILE).stat().st_size  # what the epoch-2 checkpoint needs too
        t_error, stopped_at = time.perf_counter() - t0, time.time()
        line = str(stopped.value)
        # metrics.parquet is flushed right before each checkpoint: its last write dates the failed one
        after_checkpoint = stopped_at - (run_dir / "metrics.parquet").stat().st_mtime

        # what the helper makes of Ray's TrainingFailedError (main raises `from None`: the context)
        helper = failure_line(stopped.value.__context__, resolve(str(run_dir)))
        print(f"\nerror line {t_error:.1f}s after the start, {after_checkpoint:.1f}s after the epoch-2 checkpoint "
              f"was due:\n{line}\nhelper: {helper}")
        assert "\n" not in helper
        assert helper.startswith(f"checkpoint storage full: {run_dir}: No space left on device (ENOSPC)"), helper
        assert f"after epoch-0001: {size / 2**20:.1f} MB needed" in helper, helper
        assert "MB free; stopped before training on" in helper, helper
        assert "checkpoints are complete and kept (newest: epoch-0001)" in helper, helper
        assert "Free space there or enlarge the disk" in helper, helper
        assert helper.endswith("then re-run the same command: it resumes from epoch-0001"), helper
        # orchestration/train.py main(): `except ray.train.TrainingFailedError as err:
        #     raise SystemExit(f"error: {checkpoint.failure_line(err, run)}") from None`
        assert line == f"error: {helper}", "main() does not print checkpoint.failure_line(err, run)"

        # the registered checkpoint is complete and loads; nothing else is on the storage
        assert ray_checkpoints(resolve(str(run_dir))) == ["epoch-0001"]
        assert load_checkpoint(run_dir / "epoch-0001" / FILE)["epoch"] == 1
        assert checkpoint_folders(run_dir) == ["epoch-0001"], "a half-written checkpoint was left"
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        assert not (run_dir / "summary.json").exists()
        # checked before Ray's copy: the disk was never filled up with a doomed one (half a
        # checkpoint was left; a copy would have taken it to 0)
        assert low.free > size / 4, f"the disk went down to {low.free} bytes free"
        state = json.loads((run_dir / "state.json").read_text())
        assert state["starts"] == 1  # Ray's retry stopped in restore(), before training on

        # the user's fix: the other job's files deleted; the same command resumes and completes
        other.unlink()
        t1 = time.perf_counter()
        assert train.main(["--config", str(path)]) == 0
        print(f"resumed run: {time.perf_counter() - t1:.1f}s")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["resumed_at"] == [7]  # the end of epoch 1 (7 steps)
        assert ray_checkpoints(resolve(str(run_dir))) == ["epoch-0001", "epoch-0002"]
        assert checkpoint_folders(run_dir) == ["epoch-0001", "epoch-0002"]
        assert load_checkpoint(run_dir / "epoch-0002" / FILE)["epoch"] == 2


def test_a_copy_that_runs_out_of_space_anyway_is_removed(local_ray, demo_shards, tmp_path):
    """The free-space check passed, then the copy failed: here the disk has bytes but no inode
    left for the checkpoint's file (as when another writer takes the space in between)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with tmpfs(tmp_path / "disk", 64, inodes=64) as disk:
        cfg = load_config(config(tmp_path, demo_shards, "inodes", storage_path=str(disk / "runs")))

        def fill_inodes_then_checkpoint(loop: dict) -> None:
            from pathlib import Path

            import torch

            from orchestration import checkpoint

            other = Path(loop["disk"]) / "other-job"
            other.mkdir()
            n = 0
            try:
                while True:
                    (other / f"{n:05d}").touch()
                    n += 1
            except OSError:
                pass
            (other / f"{n - 1:05d}").unlink()  # one inode: Ray's checkpoint folder, not its file
            model = torch.nn.Linear(4, 2)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            checkpoint.report({"epoch": 1}, rank=0, save=True, model=model, optimizer=optimizer,
                              scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), epoch=1, config=loop["cfg"])

        trainer = TorchTrainer(
            fill_inodes_then_checkpoint, train_loop_config={"disk": str(disk), "cfg": cfg.to_dict()},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
            run_config=ray.train.RunConfig(name=cfg.name, **ray_storage(cfg.storage_path),
                                           failure_config=ray.train.FailureConfig(max_failures=0)))
        with pytest.raises(ray.train.TrainingFailedError) as failed:
            trainer.fit()
        run_dir = disk / "runs" / "inodes"
        line = failure_line(failed.value, resolve(str(run_dir)))
        print(f"\n{line}")
        assert "\n" not in line
        assert line.startswith(f"checkpoint storage full: {run_dir}: No space left on device (ENOSPC) while "
                               "Ray Train copied checkpoint epoch-0001"), line
        assert "inodes for 1 more file(s)" in line and "the partial copy was removed" in line, line
        assert "No checkpoint was registered yet" in line, line
        assert line.endswith("re-run the same command: it starts from the beginning"), line
        assert checkpoint_folders(run_dir) == []
