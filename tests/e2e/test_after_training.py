"""What users reach for after (and while) training, on one real run (the OUTPUTS run of
tests/helpers/runs.py on the tier's local Ray: alexnet-tiny, 2 workers, 2 epochs, crop 64):
the real commands, `python -m orchestration.evaluate` and `.predict` in processes of their
own, TensorBoard's own reader on the event files, the training log, raising `epochs` on the
finished run, and `init_from`. (Exports: tests/test_model_export.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers.runs import OUTPUTS, VAL_SIZE, epoch_rows, summary, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestration import train
from shards.layouts import split_tars

ROOT = Path(__file__).resolve().parents[2]


def command(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def finished(machines, demo_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a finished 2-epoch run."""
    from helpers.clusters import LocalRay

    machines.use("local", LocalRay)
    tmp = tmp_path_factory.mktemp("after")
    config = write_config(tmp, "done", demo_shards, OUTPUTS)
    assert train.main(["--config", str(config)]) == 0
    return config, tmp / "runs" / "done"


def test_evaluate_scores_the_runs_own_final_top1(finished):
    _, run = finished
    done = command("orchestration.evaluate", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((run / "eval.json").read_text())
    assert record["top1"] == summary(run)["top1"] and record["top5"] == summary(run)["top5"]
    assert (record["samples"], record["ten_crop"]) == (VAL_SIZE, False)
    assert record["checkpoint"].endswith("epoch-0002/checkpoint.pt")
    assert done.stdout.startswith(f"{record['checkpoint']}: top-1 ") and "\n" not in done.stdout.strip()

    from orchestration import evaluate  # N workers: a Ray Train job on the tier's Ray, the val set split between them

    assert evaluate.main([str(run), "--workers", "2"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert (record["top1"], record["samples"], record["workers"]) == (summary(run)["top1"], VAL_SIZE, 2)

    ten = command("orchestration.evaluate", str(run / "epoch-0001"), "--ten-crop", "--batch-size", "7")
    assert ten.returncode == 0, ten.stderr[-2000:]
    record = json.loads((run / "eval.json").read_text())
    assert record["ten_crop"] and record["samples"] == VAL_SIZE
    assert record["checkpoint"].endswith("epoch-0001/checkpoint.pt")
    assert abs(record["top1"] * VAL_SIZE - round(record["top1"] * VAL_SIZE)) < 1e-9


def test_predict_agrees_with_evaluate_on_the_val_images(finished, demo_shards, tmp_path):
    """The val split's own JPEG bytes as files: predict's top-1 against their labels is the
    run's top-1, image for image through the same graph; a broken file gets its own line."""
    _, run = finished
    images, labels = tmp_path / "val", {}
    images.mkdir()
    for tar in split_tars(demo_shards, "val"):
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
            for name, m in members.items():
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    (images / f"{key}.jpg").write_bytes(t.extractfile(m).read())
                    labels[f"{key}.jpg"] = int(t.extractfile(members[f"{key}.cls"]).read())
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    done = command("orchestration.predict", str(run), str(images), "--json", "--topk", "3")
    assert done.returncode == 1, done.stderr[-2000:]  # one input failed; the rest ran
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == VAL_SIZE + 1
    broken = [r for r in rows if "error" in r]
    assert [Path(r["path"]).name for r in broken] == ["zz-broken.jpg"]
    good = [r for r in rows if "top" in r]
    assert all(len(r["top"]) == 3 and {"index", "wnid", "name", "prob"} <= set(r["top"][0]) for r in good)
    hits = sum(r["top"][0]["index"] == labels[Path(r["path"]).name] for r in good)
    assert hits / VAL_SIZE == summary(run)["top1"]

    human = command("orchestration.predict", str(run / "epoch-0002" / "checkpoint.pt"), str(images / good[0]["path"]))
    assert human.returncode == 0 and human.stdout.splitlines()[0] == good[0]["path"]
    assert len(human.stdout.splitlines()) == 1 + 5


def test_tensorboard_reads_the_run_and_the_log_holds_it(finished):
    _, run = finished
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait", "val/top1", "val/top5"} <= tags
    assert any(t.startswith("loader/") for t in tags)
    top1 = acc.Scalars("val/top1")
    assert [e.value for e in top1] == pytest.approx([r["top1"] for r in epoch_rows(run)])
    log = (run / "train.log").read_text()
    assert "epoch 2/2" in log and "step 6/6" in log and "ETA" in log


def test_raising_epochs_continues_the_finished_run_and_says_what_the_lr_does(finished, capsys):
    config, run = finished
    capsys.readouterr()
    assert train.main(["--config", str(config)]) == 0
    assert "already finished 2 epochs (raise --set epochs=N to continue it" in capsys.readouterr().out
    assert train.main(["--config", str(config), "--set", "epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "run done finished 2 epochs; continuing to 3 from its last checkpoint: the cosine schedule now spans 3 " \
           "epochs, so the lr goes from" in out
    assert summary(run)["epochs"] == 3 and [r["epoch"] for r in epoch_rows(run)] == [1, 2, 3]


def test_init_from_starts_a_new_run_from_trained_weights(finished, demo_shards, tmp_path):
    _, run = finished
    config = write_config(tmp_path, "tuned", demo_shards, OUTPUTS, epochs=1, init_from=str(run))
    assert train.main(["--config", str(config)]) == 0
    log = (tmp_path / "runs" / "tuned" / "train.log").read_text()
    assert f"init_from {run}/epoch-" in log and "tensors" in log
