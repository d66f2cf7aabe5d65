"""Node-local staging of a remote shard set: each shard is fetched once per node, verified,
and read from local disk by DALI (or the torch baseline) as if the set were local.

    cache = ShardCache(resolve("s3://bucket/shards"), Path("~/.cache/alexnet-dali/shards"))
    cache.fetch_meta()                       # classes/stats/manifest/shards.parquet + every .idx
    paths = cache.fetch(["train/shard-000003.tar", ...])   # blocks until these are local
    cache.prefetch([...])                    # the next part, in a background thread

The mirror of a set lives in `<cache_dir>/<digest of its URI>/` with the set's own layout.
A fetch takes an exclusive file lock per shard (`fcntl.flock`), so workers on one node wait
for, never duplicate, a download; it downloads to a temporary name, checks bytes and sha256
against `shards.parquet` (bytes against the store's listing for sets from other writers),
then renames into place, stamping the good hash (`pipeline.integrity`). A cached file is
re-checked the first time a process uses it: its size always, its sha256 only where no stamp
says this very file (path, inode, size, mtime) hashed right before, so a restart does not
hash the node's copies again, while a truncated or rewritten copy is fetched again.
`max_bytes` bounds the mirror: least recently used shards go first (by access time, which a
use sets; a shard a running pipeline has open stays readable after its unlink, as POSIX
files do).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pipeline.integrity import file_sha256, hash_matches, size_ok, stamp
from shards.layouts import CLASSES_FILE, IDX_SUFFIX, MANIFEST_FILE, REPACK, SHARDS_FILE, STATS_FILE, TAR_SUFFIX
from shards.location import Location, StorageError, resolve

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "alexnet-dali" / "shards"
META_FILES = (CLASSES_FILE, STATS_FILE, MANIFEST_FILE, SHARDS_FILE)


def mirror_dir(uri: str, cache_dir: Path) -> Path:
    """Where the local mirror of the set at `uri` lives (one folder per set URI)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{uri.rsplit('/', 1)[-1] or 'set'}-{digest}"


class ShardCache:
    """The node-local mirror of one remote shard set (see the module docstring)."""

    def __init__(self, root: Location, cache_dir: str | os.PathLike | None = None, max_bytes: int = 0) -> None:
        self.root = root
        self.dir = mirror_dir(root.uri, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
        self.max_bytes = int(max_bytes)
        self.expected: dict[str, tuple[int, str | None]] = {}  # rel path -> (bytes, sha256)
        self._checked: set[str] = set()  # files this process has verified
        self._pinned: set[str] = set()  # the current pass's shards: never evicted for the next's
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._evicting = threading.RLock()
        self.fetched_bytes = 0  # downloaded by this process (for the benchmark)
        self.meta_bytes = 0  # set files (manifest, shards.parquet, ...) downloaded by this process
        self.fetch_s = 0.0

    # ---------------------------------------------------------------- set files and indexes
    def fetch_meta(self, splits: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
        """Stage the set files and every index of `splits`; returns split -> [(tar name, bytes)]
        as the store lists them. The set files are fetched once per node (issue 23: every rank
        downloaded the manifest at every start): under one file lock, a file whose stored size
        and modification time (one listing of the set's folder) match the local copy's record
        is not fetched again; a re-packed set changes them, so it is never read stale."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stored = {f.base_name: f for f in self.root.list()}
        (self.dir / ".locks").mkdir(exist_ok=True)
        with open(self.dir / ".locks" / "set-files.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait, then find it fetched
            for name in META_FILES:
                info, local, record = stored.get(name), self.dir / name, self.dir / f".{name}.stored"
                if info is None:
                    local.unlink(missing_ok=True)
                    continue
                stamp = f"{info.size} {info.mtime_ns}"
                if local.is_file() and local.stat().st_size == info.size and record.is_file() \
                        and record.read_text() == stamp:
                    continue
                data = (self.root / name).read_bytes()
                _write_atomic(local, data)
                _write_atomic(record, stamp.encode())
                self.meta_bytes += len(data)
        self._read_expected()
        listing: dict[str, list[tuple[str, int]]] = {}
        for split in splits:
            entries = {f.base_name: f for f in (self.root / split).list()}
            tars = [(n, int(f.size)) for n, f in entries.items() if n.endswith(TAR_SUFFIX)]
            listing[split] = sorted(tars)
            (self.dir / split).mkdir(exist_ok=True)
            for name, size in tars:
                self.expected.setdefault(f"{split}/{name}", (size, None))
                idx = name[: -len(TAR_SUFFIX)] + IDX_SUFFIX
                if idx in entries:
                    self._fetch_one(f"{split}/{idx}", int(entries[idx].size), None)
        return listing

    def _read_expected(self) -> None:
        path = self.dir / SHARDS_FILE
        if not path.is_file():
            return
        for row in resolve(path).read_parquet(["split", "shard", "bytes", "sha256"], REPACK).to_pylist():
            self.expected[f"{row['split']}/{row['shard']}"] = (int(row["bytes"]), row["sha256"])

    # ---------------------------------------------------------------- shards
    def local(self, rel: str) -> Path:
        return self.dir / rel

    def fetch(self, rels: Iterable[str]) -> list[Path]:
        """Make these shards local (waiting for prefetches in flight); their local paths."""
        paths = []
        for rel in rels:
            with self._lock:
                pending = self._pending.pop(rel, None)
            if pending is not None:
                pending.result()  # re-raises a failed background fetch
            size, sha = self.expected.get(rel, (None, None))
            paths.append(self._fetch_one(rel, size, sha))
        return paths

    def pin(self, rels: Iterable[str]) -> None:
        """The shards the current pass reads: eviction leaves them alone until the next pin."""
        with self._lock:
            self._pinned = set(rels)

    def prefetch(self, rels: Iterable[str]) -> None:
        """Fetch these in a background thread, in order (what the next part will need)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage")
            for rel in rels:
                if rel not in self._pending:
                    size, sha = self.expected.get(rel, (None, None))
                    self._pending[rel] = self._pool.submit(self._fetch_one, rel, size, sha)

    def wait(self) -> None:
        """Until the prefetches in flight are done (they stay pending for `fetch`): the cache's
        files then change only when the loader reads again."""
        with self._lock:
            pending = list(self._pending.values())
        for fut in pending:
            fut.exception()

    def check_space(self, rels: Iterable[str], what: str) -> None:
        """Fail in one line when the cache disk cannot hold the shards one pass needs."""
        need = sum(self.expected.get(r, (0, None))[0] for r in rels if not self._valid_size(r))
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        bound = self.max_bytes
        held = sum(self.expected.get(r, (0, None))[0] for r in rels)
        if bound and held > bound:
            raise StorageError(f"cache_max_gb={bound / 1e9:g}: {what} needs {held / 1e9:.2f} GB of shards staged at "
                               f"once in {self.dir}; raise cache_max_gb or use more workers")
        if need > free:
            raise StorageError(f"{self.dir}: {need / 1e9:.2f} GB to stage for {what} but {free / 1e9:.2f} GB free; "
                               "free space, point cache_dir at a larger disk, or set cache_max_gb")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _valid_size(self, rel: str) -> bool:
        path = self.dir / rel
        size = self.expected.get(rel, (None, None))[0]
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _fetch_one(self, rel: str, size: int | None, sha: str | None) -> Path:
        final = self.dir / rel
        if rel in self._checked and final.is_file():
            _touch(final)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.dir / ".locks" / (rel.replace("/", "__") + ".lock")
        lock_path.parent.mkdir(exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker's download of it: wait for it
            if final.is_file() and self._matches(final, size, sha):
                _touch(final)
                self._checked.add(rel)
                return final
            if final.is_file():
                log.warning("%s: cached copy is truncated or corrupt; fetching it again", final)
                final.unlink()
            # with a bound, making room and filling it is one step (the prefetch thread fetches too)
            with self._evicting if self.max_bytes else contextlib.nullcontext():
                if size and not self._evict(size) and rel not in self._pinned:
                    return final  # a prefetch that does not fit beside the current pass: fetched when needed
                tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                t0 = time.perf_counter()
                try:
                    (self.root / rel).download(tmp)
                    if not size_ok(tmp, size) or (sha is not None and file_sha256(tmp) != sha):
                        raise StorageError(f"{self.root / rel}: downloaded {tmp.stat().st_size} bytes that do not "
                                           f"match {SHARDS_FILE} ({size} bytes, sha256 {sha}); re-upload the shard")
                    os.replace(tmp, final)
                    if sha is not None:
                        stamp(final, sha)  # same inode and mtime after the rename: no hash at the next start
                finally:
                    tmp.unlink(missing_ok=True)
            self.fetch_s += time.perf_counter() - t0
            self.fetched_bytes += final.stat().st_size
            self._checked.add(rel)
            return final

    @staticmethod
    def _matches(path: Path, size: int | None, sha: str | None) -> bool:
        return size_ok(path, size) and (sha is None or hash_matches(path, sha))

    def _evict(self, incoming: int) -> bool:
        """Delete least recently used shards (never the current pass's) until `incoming` more
        bytes fit under max_bytes; False when they cannot. Serialised within the process (the
        prefetch thread evicts too); files another process removes meanwhile are skipped."""
        if not self.max_bytes:
            return True
        with self._evicting:
            held = []
            for path in self.dir.glob(f"*/*{TAR_SUFFIX}"):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                held.append((st.st_atime, st.st_size, path))
            total = sum(s for _, s, _ in held)
            for _, size, path in sorted(held):
                if total + incoming <= self.max_bytes:
                    break
                rel = f"{path.parent.name}/{path.name}"
                if rel in self._pinned:
                    continue
                path.unlink(missing_ok=True)
                self._checked.discard(rel)
                total -= size
            return total + incoming <= self.max_bytes


def _touch(path: Path) -> None:
    """Mark as recently used: its access time (eviction goes by it); the mtime stays, so the
    file's hash stamp does too."""
    try:
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    except OSError:
        pass


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
