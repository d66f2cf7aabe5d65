"""Whether a tar's bytes are still those `shards.parquet` recorded, kept off the path to the
first batch (issue 23: hashing a rank's part before reading cost ~1 s per GB per start).

- Before a tar is read, `size_ok` compares its size with the recorded `bytes` (one stat):
  a truncated or grown tar is decode-checked before DALI reads it.
- Its sha256 is checked by `Hasher`, one low-priority background thread per process, which
  never holds up a batch. A good hash leaves a stamp (`stamped`), keyed by the file's path,
  inode, size and mtime, so a node hashes each tar once, not once per start or restart; a
  write to the tar changes its mtime and so retires the stamp.
- A tar whose hash differs is reported (`Hasher.failed`); the loader names it under
  `on_corrupt` when it reads it (a corrupt image also fails DALI's decoder, which the loader
  names too). `python -m shards verify` hashes the whole set in the foreground.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

VERIFIED_DIR = Path.home() / ".cache" / "alexnet-dali" / "verified"  # stamps of tars whose sha256 matched
_CHUNK = 8 << 20
# Bytes hashed, by the name of the thread that hashed them: what shows that no loader thread
# hashes before a batch (the scale and corrupt tests read it).
HASHED_BYTES: Counter[str] = Counter()
_COUNT_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    name, done = threading.current_thread().name, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
    with _COUNT_LOCK:
        HASHED_BYTES[name] += done
    return h.hexdigest()


def _stamp_path(path: Path, sha: str) -> Path | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = f"{path.resolve()}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{sha}"
    return VERIFIED_DIR / hashlib.sha256(key.encode()).hexdigest()[:32]


def stamped(path: str | os.PathLike, sha: str) -> bool:
    """Whether this very file (same path, inode, size, mtime) has hashed to `sha` on this node."""
    stamp = _stamp_path(Path(path), sha)
    return stamp is not None and stamp.is_file()


def stamp(path: str | os.PathLike, sha: str) -> None:
    """Remember that `path` hashed to `sha` (until the file is written again)."""
    target = _stamp_path(Path(path), sha)
    if target is not None:
        VERIFIED_DIR.mkdir(parents=True, exist_ok=True)
        target.touch()


def hash_matches(path: str | os.PathLike, sha: str) -> bool:
    """Whether `path` hashes to `sha`, reading it only when no stamp says so already."""
    if stamped(path, sha):
        return True
    if file_sha256(path) != sha:
        return False
    stamp(path, sha)
    return True


def size_ok(path: str | os.PathLike, size: int | None) -> bool:
    """Whether the file has the recorded size (None: nothing recorded, taken as it is)."""
    if size is None:
        return True
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


class Hasher:
    """One daemon thread per process that hashes queued tars at the lowest CPU priority and
    stamps the good ones; `failed()` names those whose bytes differ. The thread ends when the
    queue is empty and starts again with the next tar."""

    _instance: Hasher | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def shared(cls) -> Hasher:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._seen: set[tuple[str, str]] = set()
        self._bad: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._thread: threading.Thread | None = None

    def submit(self, path: str | os.PathLike, sha: str) -> None:
        """Hash `path` in the background unless it is stamped or already queued."""
        item = (str(path), sha)
        with self._lock:
            if item in self._seen:
                return
            self._seen.add(item)
        if stamped(path, sha):
            return
        with self._lock:
            self._busy += 1
            self._queue.put(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tar-hash", daemon=True)
                self._thread.start()

    def failed(self) -> set[str]:
        """Paths whose sha256 differed from the recorded one."""
        with self._lock:
            return set(self._bad)

    def wait_idle(self) -> None:
        """Block until every queued tar is hashed (tests and `shards verify`-like callers)."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0)

    def _run(self) -> None:
        try:  # Linux: a thread is a task with its own nice value; the lowest priority, not the loader's
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:  # no thread lives while nothing is queued (a fork then copies none)
                try:
                    path, sha = self._queue.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            try:
                if not hash_matches(path, sha):
                    log.warning("%s: its bytes differ from shards.parquet (sha256); the loader names it when it "
                                "reads it; run `python -m shards verify` and re-pack it", path)
                    with self._lock:
                        self._bad.add(path)
            except OSError as e:  # removed meanwhile (an evicted staged copy): nothing to judge
                log.debug("%s: not hashed (%s)", path, e)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
