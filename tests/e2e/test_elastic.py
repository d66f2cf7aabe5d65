"""Elastic training (`workers: [1, 2]`) on a local cluster of two 1-CPU nodes (and a 0-CPU
head for the driver and Ray Train's controller), all on loopback: the run starts with 2
workers; after a step checkpoint of epoch 1 the node of rank 1 goes (its raylet SIGKILLed),
Ray Train restarts the group with the 1 worker that fits and the rest of epoch 1 is
resharded onto it; a node joins again and at Ray's next resize check the group grows back
to 2, resharding again (the shrunk group waits after its first checkpoint until Ray Train
replaces it, tests/helpers/hooks.py HoldWhileShrunk, so a fast run cannot end before
Ray's resize check comes). Judged by the sample ledger (every sample of every epoch at most
once; all but the drop-last remainder, fewer than one global batch of the shape that ends
the epoch, and exactly an unresized epoch's where the epoch was not resized), the world
sizes recorded ([2, 1, 2]) and the lr of every step (the linear rule on the global batch of
that step's world size); the time from the node loss to training again is printed.

`ALEXNET_ELASTIC_DEMO=1 pytest -s tests/e2e/test_elastic.py` runs the same drill on
the demo itself (`configs/demo.yaml` on `data/shards`, `make shards` first; about 10 minutes
here) and also checks that it still reaches its accuracy target: at the suite's scale
(240 samples, a few epochs) AlexNet learns too little for an accuracy check to mean anything.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.clusters import ROOT, TwoNodes, when_registered
from helpers.runs import RESUMABLE, write_config

from orchestration.config import load_config
from orchestration.schedule import lr_at

DEMO = os.environ.get("ALEXNET_ELASTIC_DEMO") == "1"
ELASTIC = {"workers": [1, 2], "max_failures": 3, "log_every": 1, "elastic_resize_monitor_interval_s": 5.0,
           "keep_checkpoints": 1}
if DEMO:  # the demo as `make train` runs it, made elastic
    TRAIN, BATCH, FIRST_CHECKPOINT, TARGET_TOP1 = 2600, 64, "epoch-0000-step-0000010", 0.80
else:
    TRAIN, BATCH, FIRST_CHECKPOINT, TARGET_TOP1 = 240, 16, "epoch-0000-step-0000003", None
    ELASTIC.update(epochs=2, lr_base_batch=BATCH, lr=0.01, warmup_epochs=0.5)
# After a node loss Ray Train first tries the old size on resources it has not yet seen go,
# and waits this long for that group before it settles for the workers that fit (default 60 s).
START_TIMEOUT_S = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")


def demo_config(tmp: Path) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(ELASTIC, name="elastic-demo", storage_path=str(tmp / "runs"), shards_dir=str(ROOT / "data" / "shards"),
               lr_base_batch=cfg["batch_size"] * cfg["workers"])  # the demo's lr at its 2 workers
    path = tmp / "elastic-demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being replaced
        return {}


def wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def elastic_run(machines, demo_shards, tmp_path_factory):
    """The run, the moments it lost and regained a node, and the driver's log. A cluster of
    its own: Ray Train's worker group start timeout is shortened for every process of it."""
    tmp = tmp_path_factory.mktemp("elastic")
    path = demo_config(tmp) if DEMO else write_config(tmp, "elastic", demo_shards, RESUMABLE, **ELASTIC)
    run_dir = tmp / "runs" / load_config(path).name
    log_path = tmp / "driver.log"
    nodes = machines.use("elastic-nodes", lambda: TwoNodes({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": START_TIMEOUT_S}))
    driver = nodes.driver(path, log_path, "hold-while-shrunk")
    try:
        assert when_registered(run_dir, FIRST_CHECKPOINT), log_path.read_text()[-3000:]
        rank0 = read_state(run_dir)["attempts"][0]["rank0_node"]
        lost = next(n for n in nodes.cluster.worker_nodes if n.node_id != rank0)  # rank 1's node
        nodes.cluster.remove_node(lost, allow_graceful=False)
        lost_at = time.time()
        attempts = wait_for(lambda: [a for a in read_state(run_dir).get("attempts", [])[1:]
                                     if a["first_step_unix"]], 300, "training again with 1 worker", log_path)
        assert attempts[0]["world_size"] == 1, attempts
        nodes.add_node()
        joined_at = time.time()
        assert driver.wait(timeout=1800 if DEMO else 600) == 0, log_path.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    machines.release()  # the node it lost is gone: no other drill runs on this cluster
    return {"run_dir": run_dir, "config": path, "lost_at": lost_at, "joined_at": joined_at, "log": log_path}


def test_world_sizes_follow_the_nodes(elastic_run):
    run_dir = elastic_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_sizes"] == [2, 1, 2], (summary, elastic_run["log"].read_text()[-3000:])
    attempts = read_state(run_dir)["attempts"]
    shrink, grow = attempts[1], attempts[2]
    assert 0 < shrink["epoch_samples"] < TRAIN and shrink["epochs_done"] == 0  # mid-epoch 1
    recover_s = shrink["first_step_unix"] - elastic_run["lost_at"]
    grow_s = grow["first_step_unix"] - elastic_run["joined_at"]
    print(f"\nnode lost -> training again with 1 worker: {recover_s:.1f} s (Ray Train's worker group start "
          f"timeout {START_TIMEOUT_S} s); node joined -> training with 2: {grow_s:.1f} s; top-1 "
          f"{summary['top1']:.3f}, {summary['wall_s']:.0f} s training")
    assert recover_s > 0 and grow_s > 0  # training again after each event (how long: printed, not judged)
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert {r["world_size"] for r in rows} == {1, 2}
    if TARGET_TOP1 is not None:
        assert summary["top1"] >= TARGET_TOP1, summary


def test_every_sample_of_every_epoch_is_trained_once(elastic_run):
    rows = pq.read_table(elastic_run["run_dir"] / "samples").to_pylist()
    attempts = read_state(elastic_run["run_dir"])["attempts"]
    resized = {a["epochs_done"] + 1 for a in attempts[1:] if a["epoch_samples"]}  # epochs resharded mid-way
    step_ws = world_sizes_by_step(rows)
    for epoch in range(1, load_config(elastic_run["config"]).epochs + 1):
        keys = [r["key"] for r in rows if r["epoch"] == epoch]
        twice = [k for k, c in Counter(keys).items() if c > 1]
        assert not twice, f"epoch {epoch}: trained twice: {twice[:5]}"
        last_ws = step_ws[max(r["step"] for r in rows if r["epoch"] == epoch)]
        dropped = TRAIN - len(keys)
        if epoch in resized:
            assert 0 <= dropped < last_ws * BATCH, (epoch, dropped)
        else:  # an epoch at one world size drops what an unresized epoch drops
            assert dropped == TRAIN - last_ws * ((TRAIN // last_ws) // BATCH) * BATCH, (epoch, dropped)
    assert 1 in resized, attempts


def world_sizes_by_step(ledger_rows: list[dict]) -> dict[int, int]:
    """The world size of each step: the number of ranks in its ledger rows."""
    ranks: dict[int, set] = {}
    for r in ledger_rows:
        ranks.setdefault(r["step"], set()).add(r["rank"])
    return {step: len(v) for step, v in ranks.items()}


def test_the_lr_of_every_step_follows_its_global_batch(elastic_run):
    cfg = load_config(elastic_run["config"])
    ledger = pq.read_table(elastic_run["run_dir"] / "samples").to_pylist()
    per_step = Counter(r["step"] for r in ledger)
    step_ws = world_sizes_by_step(ledger)
    steps = [r for r in pq.read_table(elastic_run["run_dir"] / "metrics.parquet").to_pylist() if r["top1"] is None]
    assert len(steps) == len(per_step)  # log_every 1: a row per step trained, none twice
    seen: Counter = Counter()
    for row in sorted(steps, key=lambda r: r["step"]):
        ws = row["world_size"]
        assert step_ws[row["step"]] == ws and per_step[row["step"]] == ws * BATCH
        progress = (row["epoch"] - 1) + seen[row["epoch"]] / TRAIN
        expected = lr_at(cfg, ws * BATCH, progress, ws * BATCH / TRAIN)
        assert row["lr"] == pytest.approx(expected, rel=1e-9), (row, expected)
        seen[row["epoch"]] += per_step[row["step"]]
