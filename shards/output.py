"""Where a pack goes: the output location, the packer's journal in it, and how a sealed shard
gets there.

A local `--out` is written in place, as always: shards are sealed under their final names and
the journal record follows. A remote `--out` (`s3://bucket/prefix`, any pyarrow URI) is packed
in a local work directory; each sealed shard is uploaded on a background thread (index, then
tar, then its journal record as the commit marker) and deleted locally, so the local disk
holds about one shard. The journal (`.pack/state.json`, `.pack/<split>/<shard>.json`) lives in
the output itself, so a re-run on any machine resumes from what the store holds.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shards.index import atomic_write_bytes
from shards.layouts import (
    CLASSES_FILE,
    IDX_SUFFIX,
    MANIFEST_FILE,
    PACK_DIR,
    REJECTS_FILE,
    SHARDS_FILE,
    SPLITS,
    STATS_FILE,
    TAR_SUFFIX,
    index_name,
    shard_name,
)
from shards.location import Location, corrupt_file, resolve, storage_error
from shards.store_check import require
from shards.upload import Uploader, read_hashed
from shards.writer import ShardWriter

STATE_FILE = "state.json"
OVERWRITE_HINT = "re-run with --overwrite to clear what the earlier pack left (or choose another --out)"
PART_SUFFIX = ".parquet"  # beside each record: `.pack/<split>/<shard>.parquet`, its manifest rows and rejects
# The set files, in the order they are written after the last shard: manifest.parquet last,
# so a reader that finds it finds the whole set.
SET_FILES = (REJECTS_FILE, CLASSES_FILE, STATS_FILE, SHARDS_FILE, MANIFEST_FILE)


def default_work_dir(uri: str) -> Path:
    """`~/.cache/alexnet-dali/pack/<hash of the output URI>`: one per output, reused on re-runs."""
    return Path.home() / ".cache" / "alexnet-dali" / "pack" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _holds_files(loc: Location) -> bool:
    """Whether any object lies under `loc` (empty "folder" marker objects do not count)."""
    for f in loc.list():
        if f.type == pafs.FileType.File or (f.type == pafs.FileType.Directory and _holds_files(loc / f.base_name)):
            return True
    return False


@dataclass
class UploadStats:
    shards: int = 0
    bytes: int = 0


@dataclass
class PackOutput:
    """The output of one packer run: `loc` (where the set goes) and `work` (where shards are
    written; `loc` itself when it is local)."""

    loc: Location
    work: Path
    uploads: UploadStats = field(default_factory=UploadStats)
    _uploader: Uploader | None = None
    _lock: int | None = None

    @classmethod
    def open(cls, out: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> PackOutput:
        """Resolve `out`; for a remote one check the bucket and that the store keeps the bytes
        written (`shards.store_check`, one line when it cannot be used), and take the work
        directory. Nothing is written to a local `out` yet."""
        loc = resolve(out)
        if not loc.remote:
            if work_dir is not None:
                raise ValueError(f"--work-dir is for a remote --out; {loc.uri} is local and written in place")
            return cls(loc, loc.local_path())
        store = require(loc)  # the store keeps what is written, or one line before any work
        if store.applied:
            print(store.line(), file=sys.stderr)
            loc = resolve(loc.uri)  # a client made with the settings now in the environment
        work = Path(work_dir).expanduser().resolve() if work_dir is not None else default_work_dir(loc.uri)
        try:
            work.mkdir(parents=True, exist_ok=True)
            lock = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PermissionError(f"{work}: work directory not writable ({e.strerror}); "
                                  "pass another --work-dir") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ValueError(f"{work}: another packer is using this work directory (for {loc.uri}); "
                             "wait for it to finish or pass another --work-dir") from None
        return cls(loc, work, _uploader=Uploader(pending=1), _lock=lock)

    @property
    def remote(self) -> bool:
        return self.loc.remote

    # ------------------------------------------------------------------ the journal
    def prepare(self, fingerprint: str, settings: dict, overwrite: bool) -> dict:
        """Check the output; returns the saved state when it may be resumed, else a new one
        (saved). Other settings are refused unless `overwrite`, which clears the output."""
        if not self.remote:
            out = self.work
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".pack-write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise PermissionError(f"{out}: output not writable ({e.strerror}); fix its permissions or "
                                      "choose another --out") from None
        if overwrite:  # whatever the old output holds: cleaned, never parsed
            self.clean()
        state = None if overwrite else self.read_state()
        if state is not None and state.get("fingerprint") != fingerprint:
            changed = [k for k in settings if state["settings"].get(k) != settings[k]] or ["the source's file list"]
            raise ValueError(
                f"{self.loc.uri}: already holds shards packed from {state['settings']['source']} with other "
                f"settings ({', '.join(changed)} differ); pass --overwrite to replace them or choose another --out"
            )
        elif state is None and not overwrite and (_holds_files(self.loc) if self.remote else self.loc.list()):
            raise ValueError(f"{self.loc.uri}: not empty and not written by the packer; pass --overwrite or "
                             "choose an empty --out")
        if state is None:
            state = {"fingerprint": fingerprint, "settings": settings, "complete": False}
            self.save_state(state)
        if not self.remote:  # temp files of the state and set files a killed run left behind
            for p in [*(self.work / PACK_DIR).glob("*.tmp"), *self.work.glob("*.tmp")]:
                p.unlink(missing_ok=True)
        return state

    def read_state(self) -> dict | None:
        """`.pack/state.json` (None when absent); one line naming it when it does not parse."""
        state_loc = self.loc / PACK_DIR / STATE_FILE
        if not state_loc.is_file():
            return None
        state = state_loc.read_json(OVERWRITE_HINT)
        if not (isinstance(state, dict) and isinstance(state.get("settings"), dict) and "fingerprint" in state):
            raise corrupt_file(state_loc.uri, ValueError("no fingerprint and settings"), OVERWRITE_HINT)
        return state

    def save_state(self, state: dict) -> None:
        if not self.remote:
            (self.work / PACK_DIR).mkdir(exist_ok=True)
        (self.loc / PACK_DIR / STATE_FILE).write_bytes(json.dumps(state, indent=1).encode())

    def records(self, split: str) -> list[dict]:
        """Records of the split's published shards, in order (a prefix of the plan): a record
        counts when its tar and index are there too."""
        journal = {f.base_name for f in (self.loc / PACK_DIR / split).list()}
        files = {f.base_name for f in (self.loc / split).list()}
        names = []
        while (name := shard_name(len(names))) + ".json" in journal and name in files and index_name(name) in files:
            names.append(name)
        def read(name: str) -> dict:
            return (self.loc / PACK_DIR / split / (name + ".json")).read_json(OVERWRITE_HINT)

        if self.remote and len(names) > 1:
            with ThreadPoolExecutor(16) as pool:
                records = list(pool.map(read, names))
        else:
            records = [read(n) for n in names]
        for rec in records:  # journals of packers before shards.parquet: hash the published tar once
            if "samples" not in rec:
                rec["samples"] = len(rec["rows"])
            if "sha256" not in rec:
                rec["sha256"] = read_hashed(self.loc / split / rec["shard"])[1]
        return records

    # ------------------------------------------------------------------ shards
    def shard_dir(self, split: str) -> Path:
        """Where the split's shards are written; stale temp files (and, for a remote output,
        shards sealed but never committed) are removed."""
        d = self.work / split
        d.mkdir(parents=True, exist_ok=True)
        stale = [p for p in d.iterdir()
                 if p.name.endswith(".tmp") or (self.remote and p.name.endswith((TAR_SUFFIX, IDX_SUFFIX)))]
        if not self.remote:  # a kill during a journal write leaves its temp file there
            journal = self.work / PACK_DIR / split
            journal.mkdir(parents=True, exist_ok=True)
            stale += [p for p in journal.iterdir() if p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return d

    def commit(self, split: str, writer: ShardWriter, record: dict, part: bytes) -> None:
        """Publish a sealed shard with its part (manifest rows and rejects, Parquet) and its
        record, the commit marker. Locally the part and record are written first, then the
        tar renamed into place, so every tar under its final name is committed; remotely the
        shard is uploaded in the background (index, tar, part, record) and then removed from
        the work directory."""
        data = json.dumps(record).encode()
        journal = self.loc / PACK_DIR / split
        tar, idx = writer.tar_path, writer.idx_path
        if not self.remote:
            atomic_write_bytes(self.work / PACK_DIR / split / (tar.name + PART_SUFFIX), part)
            atomic_write_bytes(self.work / PACK_DIR / split / (tar.name + ".json"), data)
            writer.publish()
            return
        writer.publish()

        def upload() -> None:
            (self.loc / split / idx.name).upload(idx)
            (self.loc / split / tar.name).upload(tar)
            (journal / (tar.name + PART_SUFFIX)).write_bytes(part)
            (journal / (tar.name + ".json")).write_bytes(data)
            self.uploads.shards += 1
            self.uploads.bytes += idx.stat().st_size + tar.stat().st_size
            idx.unlink()
            tar.unlink()

        self._uploader.submit(upload)

    def read_part(self, split: str, shard: str) -> pa.Table:
        """The Parquet part (manifest rows and rejects) of a committed shard; one line naming
        it when it does not parse."""
        loc = self.loc / PACK_DIR / split / (shard + PART_SUFFIX)
        try:
            return pq.read_table(pa.BufferReader(loc.read_bytes()))
        except pa.ArrowException as err:
            raise corrupt_file(loc.uri, err, OVERWRITE_HINT) from None

    def uncommit(self, split: str, records: list[dict]) -> None:
        """Withdraw the last committed shards of a split (`records`, a tail of its journal) so
        that they are packed again: manifest.parquet goes first (the set is no longer whole),
        then their records from the last one, so the journal stays a prefix of the plan, and
        their shards."""
        (self.loc / MANIFEST_FILE).delete()
        state = self.read_state()
        if state is not None and state.get("complete"):
            state["complete"] = False
            self.save_state(state)
        for rec in reversed(records):
            (self.loc / PACK_DIR / split / (rec["shard"] + ".json")).delete()
            (self.loc / PACK_DIR / split / (rec["shard"] + PART_SUFFIX)).delete()
            (self.loc / split / rec["shard"]).delete()
            (self.loc / split / index_name(rec["shard"])).delete()

    def set_file_tmp(self, name: str) -> Path:
        """A local path to write the set file `name` at before `publish_file` puts it in place."""
        return self.work / f".{name}.tmp"

    def publish_file(self, name: str, local: Path) -> None:
        """Put a set file written at `set_file_tmp(name)` in place (complete or absent)."""
        if not self.remote:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local, self.work / name)
            return
        try:
            (self.loc / name).upload(local)
        finally:
            local.unlink(missing_ok=True)

    def wait_uploads(self) -> float:
        """Wait until every submitted shard is in the store; returns the seconds spent uploading."""
        if self._uploader is None:
            return 0.0
        self._uploader.close()
        return self._uploader.busy_s

    def write(self, name: str, data: bytes) -> None:
        """One set file (complete or absent)."""
        (self.loc / name).write_bytes(data)

    # ------------------------------------------------------------------ clean up
    def clean(self) -> None:
        """Remove what a packer run writes (and nothing else); manifest.parquet first, so no
        reader sees a set that is being removed."""
        if not self.remote:
            out = self.work
            shutil.rmtree(out / PACK_DIR, ignore_errors=True)
            for name in reversed(SET_FILES):
                (out / name).unlink(missing_ok=True)
            for split in SPLITS:
                d = out / split
                if d.is_dir():
                    for p in d.iterdir():
                        if p.name.endswith((TAR_SUFFIX, IDX_SUFFIX, ".tmp")):
                            p.unlink()
            for name in SET_FILES:
                (out / f".{name}.tmp").unlink(missing_ok=True)
            return
        for name in reversed(SET_FILES):
            (self.loc / name).delete()
        for split in SPLITS:
            for f in (self.loc / split).list():
                if f.type == pafs.FileType.File and f.base_name.endswith((TAR_SUFFIX, IDX_SUFFIX)):
                    (self.loc / split / f.base_name).delete()
        try:
            self.loc.fs.delete_dir((self.loc / PACK_DIR).path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise storage_error(err, (self.loc / PACK_DIR).uri) from None

    def close(self) -> None:
        """Stop the uploader (after the upload in flight, on failure) and release the work
        directory, removing it when nothing of a shard is left in it."""
        if self._uploader is not None:
            self._uploader.close(raise_errors=False)
        if self._lock is None:
            return
        for split in SPLITS:
            try:
                (self.work / split).rmdir()
            except OSError:
                pass  # absent, or a shard in progress (the next run removes it)
        if not any(p.name != ".lock" for p in self.work.iterdir()):
            (self.work / ".lock").unlink(missing_ok=True)
            self.work.rmdir()
        os.close(self._lock)
        self._lock = None

