"""The run in the tools users already have (`orchestration.tracking`): TensorBoard event files
read back by TensorBoard's own reader, the training log appended across starts, on a local
run directory and on a real S3 server (moto on loopback). A whole run writing them:
tests/e2e/test_after_training.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestration.config import from_dict, load_config
from orchestration.tracking import TENSORBOARD_DIR, TRAIN_LOG, Tracker, check_mlflow
from shards.location import resolve

BASE = {"name": "t", "storage_path": "/tmp/r", "shards_dir": "/tmp/s", "model": "alexnet-tiny", "epochs": 2,
        "batch_size": 8, "workers": 1, "use_gpu": False}


def copy_events(run, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for info in (run / TENSORBOARD_DIR).list():
        (run / TENSORBOARD_DIR / info.base_name).download(to / info.base_name)
    return to


def one_start(run, lines: list[str], steps: range, local: Path) -> None:
    tracker = Tracker(from_dict(BASE), run, rank=0)
    for line in lines:
        logging.getLogger("train").warning(line)
    for step in steps:
        tracker.scalars(step, {"train/loss": 1.0 / step, "train/lr": 0.1, "loader/dali_device_mb": None})
    tracker.scalars(steps[-1], {"val/top1": 0.5, "val/top5": 0.9})
    tracker.flush()  # an epoch end: what is there so far is where the run lives
    assert "val/top1" in read_scalars(copy_events(run, local / f"flush-{steps[0]}"))
    tracker.close()


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_event_files_and_the_log_survive_two_starts(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        run = resolve(f"{request.getfixturevalue('s3_bucket')}/runs/t")
    else:
        run = resolve(tmp_path / "runs" / "t")
    one_start(run, ["first start"], range(1, 4), tmp_path)
    one_start(run, ["second start"], range(4, 6), tmp_path)  # a restart: more event files, the log appended

    scalars = read_scalars(copy_events(run, tmp_path / "copy"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    assert scalars["train/loss"][1][1] == pytest.approx(0.5)
    assert [s for s, _ in scalars["val/top1"]] == [3, 5] and "loader/dali_device_mb" not in scalars
    log = run / TRAIN_LOG
    text = log.read_text()
    assert text.index("first start") < text.index("second start")


def test_mlflow_without_mlflow_is_one_line_before_ray(tmp_path):
    try:
        import mlflow  # noqa: F401
        pytest.skip("mlflow is installed here")
    except ImportError:
        pass
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "mlflow_tracking_uri": "http://127.0.0.1:5000"}))
    with pytest.raises(ValueError, match="mlflow_tracking_uri: 'http://127.0.0.1:5000' is set but mlflow is not "
                                         "installed here: `pip install mlflow`"):
        check_mlflow(load_config(path))
