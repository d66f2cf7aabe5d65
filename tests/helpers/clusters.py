"""Real Ray clusters for the e2e drills, all on loopback: a multi-node local cluster
(`ray.cluster_utils.Cluster`), a token-authenticated head (`orchestration/cluster/local-up.sh`,
as `make cluster-up` starts it), drivers run as scripts as users run them, and the ways a
drill interrupts a run (a Ray Train worker killed, a node gone) and watches it (Ray's
checkpoint record, the Prometheus endpoint, the Job Submission API).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from unittest.mock import patch  # patch.dict: environment variables set for a block, then restored

ROOT = Path(__file__).resolve().parents[2]  # the project
VENV_BIN = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver_env(address: str, **extra: str) -> dict[str, str]:
    """A driver on this cluster: RAY_ADDRESS, and Ray's "cluster on this platform" switch off so
    that it keeps 127.0.0.1 instead of rewriting it to the host's outward IP (where the cluster
    does not listen)."""
    return {**os.environ, "RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def train_command(path: Path, *args: str) -> list[str]:
    """`orchestration/train.py --config PATH`, as users run it; with `args` (names of
    tests/helpers/hooks.py callbacks), through tests/helpers/driver.py, which passes them in."""
    if args:
        return [sys.executable, str(ROOT / "tests" / "helpers" / "driver.py"), *args, "--", "--config", str(path)]
    return [sys.executable, "orchestration/train.py", "--config", str(path)]


class TwoNodes:
    """A 0-CPU head (the drivers' node: Ray Train's controller lives there) and two 1-CPU worker
    nodes, all on 127.0.0.1: a 2-worker run puts one worker on each. `env` goes to every
    process of the cluster (set while it starts) and to its drivers."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        from ray.cluster_utils import Cluster

        self.env = dict(env or {})
        self.dashboard_port = free_port()
        with patch.dict(os.environ, self.env):  # the nodes' processes inherit it
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
        with patch.dict(os.environ, self.env):
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

    def driver(self, path: Path, log: Path, *hooks: str) -> subprocess.Popen:
        """A driver of the run `path` in the background, its output in `log`."""
        with log.open("w") as out:
            return subprocess.Popen(train_command(path, *hooks), cwd=ROOT,
                                    env=driver_env(self.cluster.address, **self.env),
                                    stdout=out, stderr=subprocess.STDOUT, text=True)

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


class TokenHead:
    """A head from local-up.sh (as `make cluster-up`), with its own HOME (token file), ports and
    state folder under `home`; `stop()` runs local-down.sh."""

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "HOME": str(home / "home"), "RAY_DASHBOARD_PORT": str(free_port()),
                    "RAY_HEAD_PORT": str(free_port()), "RAY_METRICS_PORT": str(free_port()),
                    "RAY_LOCAL_STATE": str(home / "cluster"), "RAY_STOP_GRACE_S": "5",
                    # every process exports its metrics each second (Ray's default: 10 s), so a
                    # short run's gauges reach the Prometheus endpoint while its workers live
                    "RAY_metrics_report_interval_ms": "1000"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_MODE", None)
        up = subprocess.run(["bash", "orchestration/cluster/local-up.sh", f"--ray-client-server-port={free_port()}",
                             f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}"],
                            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180)
        if up.returncode != 0:
            self.shutdown()
            raise AssertionError(f"local-up.sh failed:\n{up.stdout}{up.stderr}")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.env['RAY_DASHBOARD_PORT']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['RAY_METRICS_PORT']}/metrics"

    @property
    def token(self) -> str:
        return (Path(self.env["HOME"]) / ".ray" / "auth_token").read_text().strip()

    def client_env(self) -> dict[str, str]:
        """The README's exports for a shell that submits jobs."""
        return {**self.env, "RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def jobs(self):
        """The Job Submission SDK (what `ray job` calls), with the token."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def shutdown(self) -> None:
        down = subprocess.run(["bash", "orchestration/cluster/local-down.sh"], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


class Machines:
    """The one Ray this tier runs at a time: `use(kind, start)` returns the running one of that
    kind, or stops the current one and starts it (`start()` returns something with shutdown())."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.held = None

    def use(self, kind: str, start):
        if self.kind != kind:
            self.release()
            self.held, self.kind = start(), kind
        return self.held

    def release(self) -> None:
        if self.held is not None:
            held, self.held, self.kind = self.held, None, None
            held.shutdown()


class LocalRay:
    """An embedded local Ray in this process, on loopback; 4 logical CPUs on this 2-core
    machine, so that 3 workers (1 CPU each) fit."""

    def __init__(self) -> None:
        import ray

        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=None, _node_ip_address="127.0.0.1", log_to_driver=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()


def wait_until_done(jobs, job: str, timeout: float = 300) -> str:
    """The job's status once terminal (STOPPED, SUCCEEDED, FAILED), or its status at the timeout."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = jobs.get_job_status(job)
        if status in {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED} or time.monotonic() > deadline:
            return status.value
        time.sleep(0.5)


def registered(run_dir: Path, marker: str) -> bool:
    """Ray's checkpoint record of the run names `marker` (a checkpoint folder)."""
    record = run_dir / "checkpoint_manager_snapshot.json"
    return record.is_file() and marker in record.read_text(errors="replace")


def when_registered(run_dir: Path, marker: str, timeout: float = 300) -> bool:
    """Wait until Ray's checkpoint record names `marker`; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registered(run_dir, marker):
            return True
        time.sleep(0.05)
    return False


def ray_train_workers() -> list[int]:
    """Pids of this machine's Ray Train worker processes (Ray titles them ray::RayTrainWorker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def kill_a_worker_when(run_dir: Path, marker: str, timeout: float = 300, sig: int = signal.SIGKILL,
                       delay: float = 0.5, writing: bool = False) -> threading.Thread:
    """In the background: once Ray has registered the checkpoint `marker` (its record names
    it), or with `writing` as soon as its folder appears (Ray is still copying it in), send
    `sig` to one Ray Train worker process, as a node's OOM killer, a crash or a spot VM's
    notice would."""

    def due() -> bool:
        return (run_dir / marker).exists() if writing else registered(run_dir, marker)

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if due():
                time.sleep(delay)  # into the next steps: the kill lands mid-epoch, between checkpoints
                for pid in ray_train_workers():
                    os.kill(pid, sig)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class scrape_while(threading.Thread):
    """Scrape a Prometheus endpoint every half second until `stop` is set: every value of
    every ray_alexnet_* sample seen (by name) and the rank labels seen."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.values: dict[str, list[float]] = {}
        self.ranks: set[str] = set()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("ray_alexnet_"):
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    self.values.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
                    self.ranks.update(re.findall(r'rank="(\d+)"', line))
