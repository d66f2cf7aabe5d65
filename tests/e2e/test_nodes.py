"""Losing a node and losing the driver, judged by the sample ledger as in test_resume.py: the
interrupted run must end with the uninterrupted run's (`reference`) ledger row for row and
bit-identical weights.

- Node loss: a local cluster (`ray.cluster_utils.Cluster`, all on loopback) of a 0-CPU head
  (the driver's node: Ray Train's controller lives there) and two 1-CPU nodes, one worker on
  each, the driver `orchestration/train.py` run as a script with RAY_ADDRESS, as users run it.
  Once Ray has registered a step checkpoint, the node of one worker goes (its raylet
  SIGKILLed, as a machine that vanishes) and a fresh 1-CPU node joins; Ray Train restarts the
  2-worker group from the newest registered checkpoint.
- Driver loss: a `ray job submit --no-wait` run on a token-authenticated head
  (orchestration/cluster/local-up.sh), stopped through the Job Submission SDK (`stop_job`, what
  `ray job stop` calls) right after a step checkpoint: the driver goes, and Ray Train's
  controller and workers with it. The same command, submitted again, resumes mid-epoch from
  what Ray registered on storage.

The reference ran on the tier's local Ray with the same 2 workers and one torch thread each
(RESUMABLE, tests/helpers/runs.py), so its weights must match a cluster's.
"""
from __future__ import annotations

import subprocess

import pytest
from helpers.clusters import ROOT, TwoNodes, wait_until_done, when_registered
from helpers.runs import STEPS_PER_EPOCH, assert_same_run, metrics_rows, summary, write_config

FIRST_STEP_CHECKPOINT = "epoch-0000-step-0000003"
SETTINGS = {"max_failures": 2}


@pytest.fixture()
def two_nodes(machines) -> TwoNodes:
    return machines.use("two-nodes", TwoNodes)


def test_losing_a_workers_node_resumes_exactly(two_nodes, reference, demo_shards, tmp_path):
    run_dir = tmp_path / "runs" / "node-lost"
    path = write_config(tmp_path, "node-lost", demo_shards, **SETTINGS)
    log = tmp_path / "driver.log"
    driver = two_nodes.driver(path, log)
    try:
        assert when_registered(run_dir, FIRST_STEP_CHECKPOINT), log.read_text()[-3000:]
        lost = two_nodes.node_of_a_worker()
        two_nodes.cluster.remove_node(lost, allow_graceful=False)  # raylet and agents SIGKILLed
        two_nodes.add_node()  # a replacement joins: the 2-worker group fits again
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    # (Ray Train's node_rank groups workers by IP, and every node is 127.0.0.1: the 1-CPU nodes
    # are what put the two 1-CPU workers on two nodes)
    assert "world_rank=1" in log.read_text()
    done = summary(run_dir)
    assert done["restarts"] == 1 and done["resumed_at"][0] in (3, 6, 7, 10, 13), done  # step 3's or a newer one
    assert done["world_sizes"] == [2, 2] and (run_dir / "curves.png").is_file()
    assert {r["world_size"] for r in metrics_rows(run_dir)} == {2}
    assert_same_run(run_dir, reference)


def test_stopping_the_job_resumes_mid_epoch_when_submitted_again(token_head, reference, demo_shards, tmp_path):
    jobs = token_head.jobs()
    path = write_config(tmp_path, "driver-lost", demo_shards, **SETTINGS)  # storage_path: absolute
    run_dir = tmp_path / "runs" / "driver-lost"

    def submit(job: str) -> None:  # the README's command line, --no-wait, a submission id of ours
        out = subprocess.run(["ray", "job", "submit", "--address", token_head.address, "--no-wait",
                              "--submission-id", job, "--working-dir", ".", "--", "python", "orchestration/train.py",
                              "--config", str(path)],
                             cwd=ROOT, env=token_head.client_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    submit("driver-lost-1")
    assert when_registered(run_dir, FIRST_STEP_CHECKPOINT), jobs.get_job_logs("driver-lost-1")[-3000:]
    jobs.stop_job("driver-lost-1")  # SIGTERM to the driver: Ray Train's controller and workers go with it
    assert wait_until_done(jobs, "driver-lost-1", timeout=60) == "STOPPED"
    assert not (run_dir / "summary.json").exists()
    stopped_at = max(summary_steps(run_dir))

    submit("driver-lost-2")  # the same command again: it resumes from what Ray registered on storage
    status = wait_until_done(jobs, "driver-lost-2", timeout=400)
    assert status == "SUCCEEDED", jobs.get_job_logs("driver-lost-2")[-3000:]
    done = summary(run_dir)
    assert done["restarts"] == 1 and len(done["resumed_at"]) == 1, done
    assert done["resumed_at"][0] == stopped_at, done  # from the newest checkpoint Ray had registered
    assert_same_run(run_dir, reference)


def summary_steps(run_dir) -> list[int]:
    """The global steps of the checkpoints in Ray's record of the run."""
    from orchestration.run_dir import ray_checkpoints
    from shards.location import resolve

    steps = []
    for name in ray_checkpoints(resolve(run_dir)):
        epochs, _, step = name.removeprefix("epoch-").partition("-step-")
        steps.append(int(step) if step else int(epochs) * STEPS_PER_EPOCH)
    return steps
