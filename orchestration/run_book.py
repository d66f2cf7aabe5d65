"""The run's own record across its starts: `state.json` while it trains, `summary.json` and
`curves.png` when it ends (rank 0 writes; every rank holds a `RunBook`).

state.json: `starts` (every start, also one that failed before any checkpoint), `elapsed_s`
(training seconds banked at epoch ends), `resumed_at` (the global step each restart resumed
from) and `attempts`: one row per start with its world size, where it resumed, the node of
rank 0, and when it started and trained its first step (how long a restart took).
Only rank 0 reads it: the others would race its writes on an object store.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from orchestration.distributed import all_reduce_sum
from orchestration.ledger import rollback
from orchestration.metrics import MetricsLog, plot_curves, summarize
from orchestration.resume import Position
from orchestration.run_dir import CURVES, STATE, SUMMARY, read_state, write_json
from shards.location import Location

log = logging.getLogger("train")


class RunBook:
    """This start's row in state.json, the banked training time, and the summary at the end."""

    def __init__(self, run: Location, rank: int, world_size: int, pos: Position, resumed: bool,
                 started: float) -> None:
        """Record this start (rank 0), drop the ledger rows of steps the restart undid, and
        agree on the attempt number (the ledger names its files by it). `started`: the
        worker's start (time.perf_counter), from which this start's training time counts."""
        self.run, self.rank, self.world_size = run, rank, world_size
        self.state: dict[str, Any] = {}
        self._since = started
        self._first_step_pending = rank == 0
        if rank == 0:
            self.state = self._start(pos, resumed)
        self.attempt = int(all_reduce_sum([float(self.state.get("starts", 0))])[0])

    def _start(self, pos: Position, resumed: bool) -> dict[str, Any]:
        if not self.run.remote:
            self.run.mkdir()
        before = read_state(self.run)
        row = {"world_size": self.world_size, "resumed_at": pos.step if resumed else None,
               "rank0_node": _node_id(), "epochs_done": pos.epoch, "epoch_samples": pos.epoch_samples,
               "started_unix": time.time(), "first_step_unix": None}
        state = {"starts": before["starts"] + 1, "elapsed_s": before["elapsed_s"] if resumed else 0.0,
                 "resumed_at": before.get("resumed_at", []) + ([pos.step] if resumed else []),
                 "attempts": before.get("attempts", []) + [row]}
        write_json(self.run / STATE, state)
        rollback(self.run, pos.step, attempt=state["starts"])
        if resumed:
            log.info("resuming %s at step %d (epoch %d + %d steps; start %d of this run)", self.run, pos.step,
                     pos.epoch, pos.epoch_step, state["starts"])
        return state

    def first_step(self) -> None:
        """After this start's first step: when training resumed."""
        if self._first_step_pending:
            self._first_step_pending = False
            self.state["attempts"][-1]["first_step_unix"] = time.time()
            write_json(self.run / STATE, self.state)

    def bank_time(self) -> None:
        """At an epoch end: add the training seconds since the last bank."""
        if self.rank == 0:
            now = time.perf_counter()
            self.state["elapsed_s"] += now - self._since
            self._since = now
            write_json(self.run / STATE, self.state)

    def finish(self, metrics: MetricsLog | None, title: str, train_size: int) -> None:
        """summary.json and curves.png from the epoch rows (rank 0)."""
        if self.rank != 0:
            return
        rows = metrics.epoch_rows()
        attempts = self.state["attempts"]
        summary = summarize(rows, wall_s=self.state["elapsed_s"], world_size=self.world_size,
                            restarts=self.state["starts"] - 1)
        summary.update(resumed_at=self.state["resumed_at"], world_sizes=[a["world_size"] for a in attempts],
                       skipped_samples=sum(r["skipped_samples"] or 0 for r in rows))
        plot_curves(rows, self.run / CURVES, title=title, resizes=resizes(attempts, train_size))
        write_json(self.run / SUMMARY, summary)


def resizes(attempts: list[dict], train_size: int) -> list[tuple[float, int, int]]:
    """(epochs of training done, world size before, after) at each restart that changed the world size."""
    return [(a["epochs_done"] + a["epoch_samples"] / train_size, before["world_size"], a["world_size"])
            for before, a in zip(attempts, attempts[1:]) if a["world_size"] != before["world_size"]]


def _node_id() -> str | None:
    """Rank 0's Ray node (None outside a Ray cluster, e.g. Ray Train's local mode)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
