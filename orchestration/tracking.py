"""The run in the tools users already have, written by rank 0: TensorBoard event files under
`<run_dir>/tensorboard/` (tensorboardX, which ray[train] installs), the full training log
at `<run_dir>/train.log` (every start appends), and MLflow when `mlflow_tracking_uri` is set.

Scalars: `train/loss`, `train/lr`, `train/images_per_s`, `train/data_wait` and the loader
gauges under `loader/` at each logged step; `val/top1`, `val/top5`, `val/loss` at each epoch
end; the x axis is the global step. A run directory on an object store gets both files
written locally and uploaded at each epoch end and at the end; the log is fetched first, so
a restart appends to it. Each epoch end closes the event file (tensorboardX writes queued
events only then) and opens the next: TensorBoard merges them, as it merges every start's.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestration.config import TrainConfig
from shards.location import Location

TENSORBOARD_DIR = "tensorboard"
TRAIN_LOG = "train.log"


def check_mlflow(cfg: TrainConfig) -> None:
    """Before Ray starts: mlflow_tracking_uri set but mlflow missing is one line."""
    if cfg.mlflow_tracking_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ValueError(f"mlflow_tracking_uri: {cfg.mlflow_tracking_uri!r} is set but mlflow is not "
                             "installed here: `pip install mlflow` (on every node), or unset the key") from None


class Tracker:
    """Rank 0's TensorBoard writer, log file and MLflow run (no-ops on other ranks)."""

    def __init__(self, cfg: TrainConfig, run: Location, rank: int) -> None:
        self.run, self.active = run, rank == 0
        self._local: Path | None = None
        self._handler: logging.Handler | None = None
        self._mlflow = None
        if not self.active:
            return
        if run.remote:  # written here, uploaded at flush
            self._local = Path(tempfile.mkdtemp(prefix="alexnet-track-"))
            log_path = self._local / TRAIN_LOG
            if (run / TRAIN_LOG).is_file():
                (run / TRAIN_LOG).download(log_path)
            events = self._local / TENSORBOARD_DIR
        else:
            run.mkdir()
            log_path, events = Path(run.path) / TRAIN_LOG, Path(run.path) / TENSORBOARD_DIR
        self._handler = logging.FileHandler(log_path, mode="a")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logging.getLogger().addHandler(self._handler)
        self._events = events
        self.writer = self._new_writer()
        if cfg.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            mlflow.set_experiment(cfg.name)
            self._mlflow = mlflow
            mlflow.start_run(run_name=cfg.name)
            mlflow.log_params({k: str(v) for k, v in cfg.to_dict().items()})

    def _new_writer(self):
        from tensorboardX import SummaryWriter

        # a name of its own per writer, in the order written (the default, seconds + host, repeats within a
        # second, and TensorBoard reads files in name order: a step going back purges what follows it)
        return SummaryWriter(str(self._events), flush_secs=30, filename_suffix=f".{time.time_ns():020d}")

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """`{"train/loss": x, ...}` at global step `step` (None values are skipped)."""
        if not self.active:
            return
        present = {k: float(v) for k, v in values.items() if v is not None}
        for key, value in present.items():
            self.writer.add_scalar(key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in present.items()}, step=step)

    def flush(self) -> None:
        """Make the files whole where the run lives (uploads for a run on an object store)."""
        if not self.active:
            return
        self._handler.flush()
        self.writer.close()  # tensorboardX's flush() leaves queued events unwritten; close() drains them
        self.writer = self._new_writer()
        self._upload()

    def _upload(self) -> None:
        if self._local is not None:
            for path in sorted(self._local.rglob("*")):
                if path.is_file():
                    (self.run / path.relative_to(self._local).as_posix()).upload(path)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, err, tb) -> None:
        """Close; when the start failed, a failure to upload is logged, never raised over its error."""
        try:
            self.close()
        except OSError as upload_err:
            if err is None:
                raise
            logging.getLogger("train").warning("tracking files not uploaded: %s", upload_err)

    def close(self) -> None:
        if not self.active:
            return
        self.writer.close()
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        self._upload()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)


def step_scalars(figures: dict[str, float], lr: float, usage: dict[str, Any]) -> dict[str, float | None]:
    """A logged step's scalars, named for TensorBoard."""
    return {"train/loss": figures["loss"], "train/lr": lr, "train/images_per_s": figures["images_per_s"],
            "train/data_wait": figures["data_wait"], **{f"loader/{k}": v for k, v in usage.items()}}
