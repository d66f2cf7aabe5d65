"""Moving shard files between the local disk and a store: the packer's background uploader
and a hashed read (size and sha256 in the same pass as the copy).

The uploader runs jobs on one thread, in the order they were submitted, so the shards a
store holds are always a prefix of the plan; `submit` blocks while `pending` jobs are still
running, which bounds the local disk to the shard being written plus `pending` sealed ones.
A failed job stops the rest and its error is raised in the caller's thread, at the next
`submit` or at `close`.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shards.location import Location, storage_error

CHUNK = 8 * 1024 * 1024


class Uploader:
    """Runs `submit`ted callables in order on one background thread, at most `pending` at a time."""

    def __init__(self, pending: int = 1) -> None:
        self._slots = threading.Semaphore(pending)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self.busy_s = 0.0  # time spent in jobs (the upload rate is bytes / busy_s)
        self._thread = threading.Thread(target=self._run, name="shard-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    job()
                    self.busy_s += time.perf_counter() - t0
            except BaseException as err:  # handed to the caller's thread
                self._error = err
            finally:
                self._slots.release()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; waits while `pending` jobs are unfinished; raises an earlier job's error."""
        self._raise()
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            self._raise()
        self._jobs.put(job)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the submitted jobs to finish (the one running, when a job has failed)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if raise_errors:
            self._raise()


def read_hashed(loc: Location, copy_to: Path | None = None) -> tuple[int, str]:
    """(bytes, sha256 hex) of the file at `loc`, read once; `copy_to` also gets a copy."""
    digest, size = hashlib.sha256(), 0
    try:
        with loc.fs.open_input_stream(loc.path) as src:
            out = open(copy_to, "wb") if copy_to is not None else None
            try:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if out is not None:
                        out.write(chunk)
            finally:
                if out is not None:
                    out.close()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise storage_error(err, loc.uri) from None
    return size, digest.hexdigest()
