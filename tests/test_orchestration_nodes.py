"""Losing a node and losing the driver, judged by the sample ledger as in
test_orchestration_resume.py: the interrupted run must end with the uninterrupted run's
ledger row for row and bit-identical weights.

- Node loss: a local cluster (`ray.cluster_utils.Cluster`, all on loopback) of a 0-CPU head
  (the driver's node: Ray Train's controller lives there) and two 1-CPU nodes, one worker on
  each. Once Ray has registered a step checkpoint, the node of one worker goes (its raylet
  SIGKILLed, as a machine that vanishes) and a fresh 1-CPU node joins; Ray Train restarts the
  2-worker group from the newest registered checkpoint.
- Driver loss: a `ray job submit --no-wait` run on a token-authenticated head
  (orchestration/cluster/local-up.sh), stopped through the Job Submission SDK (`stop_job`, what
  `ray job stop` calls) right after a step checkpoint: the driver goes, and Ray Train's
  controller and workers with it. The same command, submitted again, resumes mid-epoch from
  what Ray registered on storage.

One epoch (7 steps of 2 workers x batch 16, step checkpoints every 3 steps) is the smallest
run with a mid-epoch checkpoint to resume from. One uninterrupted reference run, on the
cluster, serves both tests: the head of the job test runs the same 2 workers with the same
torch threads (Ray Train counts workers per node by IP, and every node here is 127.0.0.1, so
each worker sees 2 local workers and takes half the cores), so its weights must match too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestration.checkpoint import FILE, load_checkpoint
from test_orchestration_cluster import ROOT, free_port, token_head  # noqa: F401  (a fixture)
from test_orchestration_resume import config, ledger

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 7  # 240 train samples, 2 workers x batch 16
FIRST_STEP_CHECKPOINT = "epoch-0000-step-0000003"
SETTINGS = {"epochs": 1, "max_failures": 2}


def driver_env(address: str) -> dict[str, str]:
    """A driver on this cluster: RAY_ADDRESS, and Ray's "cluster on this platform" switch off so
    that it keeps 127.0.0.1 instead of rewriting it to the host's outward IP (where the cluster
    does not listen; see test_orchestration_cluster.py)."""
    return {**os.environ, "RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def train_command(path: Path) -> list[str]:
    return [sys.executable, "orchestration/train.py", "--config", str(path)]


class TwoNodes:
    """A 0-CPU head (the drivers' node) and two 1-CPU worker nodes, all on 127.0.0.1; drivers
    run as scripts (`train_command`), as users run them."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.dashboard_port = free_port()
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port})
        try:
            for _ in range(2):
                self.add_node(wait=False)  # both start at once
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    def add_node(self, wait: bool = True):
        return self.cluster.add_node(wait=wait, num_cpus=1, node_ip_address="127.0.0.1",
                                     dashboard_agent_listen_port=free_port())

    def node_of_a_worker(self):
        """A worker node that holds a live Ray Train worker (the state API, through the dashboard)."""
        from ray.util.state import list_actors

        actors = list_actors(address=f"http://127.0.0.1:{self.dashboard_port}",
                             filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        held = {a.node_id for a in actors}
        nodes = [n for n in self.cluster.worker_nodes if n.node_id in held]
        assert nodes, f"no worker node holds a Ray Train worker: {actors}"
        return nodes[0]

    def train(self, path: Path, timeout: float = 300) -> None:
        out = subprocess.run(train_command(path), cwd=ROOT, env=driver_env(self.cluster.address),
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


@pytest.fixture(scope="module")
def two_nodes():
    nodes = TwoNodes()
    yield nodes
    nodes.shutdown()


@pytest.fixture(scope="module")
def reference(two_nodes, demo_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    two_nodes.train(config(tmp, demo_shards, "ref", **SETTINGS))
    run_dir = tmp / "runs" / "ref"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at"] == [] and summary["restarts"] == 0 and summary["world_size"] == 2
    return run_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "epoch-0001" / FILE)["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, ref = ledger(run_dir), ledger(reference)
    assert len(ref) == STEPS_PER_EPOCH * 2 * 16  # every sample of every step, once
    assert len({k for *_, k in ref}) == len(ref)
    assert ours == ref
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run's: {different[:5]}"


def when_registered(run_dir: Path, marker: str, timeout: float = 300) -> bool:
    """Wait until Ray's checkpoint record names `marker`; False on timeout."""
    record = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.is_file() and marker in record.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def test_losing_a_workers_node_resumes_exactly(two_nodes, reference, demo_shards, tmp_path):
    run_dir = tmp_path / "runs" / "node-lost"
    path = config(tmp_path, demo_shards, "node-lost", **SETTINGS)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(train_command(path), cwd=ROOT, env=driver_env(two_nodes.cluster.address),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        assert when_registered(run_dir, FIRST_STEP_CHECKPOINT), (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.5)  # into the next steps: the node goes between checkpoints
        lost = two_nodes.node_of_a_worker()
        two_nodes.cluster.remove_node(lost, allow_graceful=False)  # raylet and agents SIGKILLed
        two_nodes.add_node()  # a replacement joins: the 2-worker group fits again
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_at"][0] in (3, 6), summary
    assert_same_run(run_dir, reference)


# ---------------------------------------------------------------- driver loss (ray job stop)
def wait_until_done(jobs, job: str, timeout: float = 300) -> str:
    """The job's status once terminal (STOPPED, SUCCEEDED, FAILED), or its status at the timeout."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = jobs.get_job_status(job)
        if status in {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED} or time.monotonic() > deadline:
            return status.value
        time.sleep(0.5)


def test_stopping_the_job_resumes_mid_epoch_when_submitted_again(two_nodes, reference, token_head, demo_shards,
                                                                  tmp_path):
    from ray.job_submission import JobSubmissionClient

    two_nodes.shutdown()  # done with the cluster (the reference stays): its cores go to the jobs
    address = f"http://127.0.0.1:{token_head['RAY_DASHBOARD_PORT']}"
    token = (Path(token_head["HOME"]) / ".ray" / "auth_token").read_text().strip()
    jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    env = {**token_head, "RAY_AUTH_MODE": "token", "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    path = config(tmp_path, demo_shards, "driver-lost", **SETTINGS)  # storage_path: absolute
    run_dir = tmp_path / "runs" / "driver-lost"

    def submit(job: str) -> None:  # the README's command line, --no-wait, a submission id of ours
        out = subprocess.run(["ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", job,
                              "--working-dir", ".", "--", "python", "orchestration/train.py", "--config", str(path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    submit("driver-lost-1")
    assert when_registered(run_dir, FIRST_STEP_CHECKPOINT), jobs.get_job_logs("driver-lost-1")[-3000:]
    jobs.stop_job("driver-lost-1")  # SIGTERM to the driver: Ray Train's controller and workers go with it
    assert wait_until_done(jobs, "driver-lost-1", timeout=60) == "STOPPED"
    assert not (run_dir / "summary.json").exists()

    submit("driver-lost-2")  # the same command again: it resumes from what Ray registered on storage
    status = wait_until_done(jobs, "driver-lost-2", timeout=400)
    assert status == "SUCCEEDED", jobs.get_job_logs("driver-lost-2")[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and len(summary["resumed_at"]) == 1, summary
    assert summary["resumed_at"][0] % STEPS_PER_EPOCH in (3, 6), summary  # mid-epoch, not at its boundary
    assert_same_run(run_dir, reference)
