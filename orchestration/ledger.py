"""The sample ledger (`audit_samples: true`): which sample keys each step trained on, per
rank, as a Parquet dataset `<run_dir>/samples/` with columns epoch, step, rank, key.

Each rank buffers its rows and writes them as one file when a checkpoint is taken, before
the checkpoint is reported: `samples/a<attempt>-r<rank>-s<first>-<last>.parquet`. So every
row of a step at or before a registered checkpoint is on storage. A restart resumes from a
checkpoint at step S: the rows of steps after S were rolled back (the model it resumes has
not seen them), and `rollback` deletes the files of earlier attempts that reach past S
(checkpoints are taken at the same steps on every rank, so a file never straddles S).
After the run the dataset is exactly one row per sample per step the final model was
trained on; `python -m orchestration.audit RUN_DIR` checks it epoch by epoch in bounded memory.
"""
from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq

from shards.location import Location

LEDGER_DIR = "samples"
SCHEMA = pa.schema([("epoch", pa.int64()), ("step", pa.int64()), ("rank", pa.int64()), ("key", pa.string())])
_NAME = re.compile(r"^a(\d+)-r(\d+)-s(\d+)-(\d+)\.parquet$")


class SampleLedger:
    """One rank's ledger rows since its last commit (a no-op when disabled)."""

    def __init__(self, run: Location, rank: int, attempt: int, enabled: bool) -> None:
        self.dir = run / LEDGER_DIR
        self.rank, self.attempt, self.enabled = rank, attempt, enabled
        self._epochs: list[int] = []
        self._steps: list[int] = []
        self._keys: list[str] = []

    def add(self, epoch: int, step: int, keys: list[str]) -> None:
        if self.enabled:
            self._epochs += [epoch] * len(keys)
            self._steps += [step] * len(keys)
            self._keys += keys

    def commit(self) -> None:
        """Write the buffered rows (call before the checkpoint that covers them is reported)."""
        if not self.enabled or not self._keys:
            return
        table = pa.table({"epoch": self._epochs, "step": self._steps, "rank": [self.rank] * len(self._keys),
                          "key": self._keys}, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        name = f"a{self.attempt:04d}-r{self.rank:05d}-s{self._steps[0]:09d}-{self._steps[-1]:09d}.parquet"
        if not self.dir.remote:
            self.dir.mkdir()
        (self.dir / name).write_bytes(sink.getvalue())
        self._epochs, self._steps, self._keys = [], [], []


def rollback(run: Location, resumed_step: int, attempt: int) -> int:
    """Delete the ledger files of attempts before `attempt` that reach past `resumed_step`
    (their steps were rolled back by the restart); returns how many were deleted."""
    gone = 0
    for info in (run / LEDGER_DIR).list():
        m = _NAME.match(info.base_name)
        if m and int(m.group(1)) < attempt and int(m.group(4)) > resumed_step:
            (run / LEDGER_DIR / info.base_name).delete()
            gone += 1
    return gone
