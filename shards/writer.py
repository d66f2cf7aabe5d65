"""Write one shard: tar, its DALI index and its sha256 in the same pass, published atomically.

Both files are written as `*.tmp`, fsynced, and renamed index first, then tar: a reader that
sees `shard-N.tar` also sees its `shard-N.idx`, and a crash leaves only `*.tmp` files. The
tar's sha256 (shards.parquet) is taken from the bytes as they are written: no second read.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from shards.index import IndexBuilder
from shards.layouts import IMAGE_EXT, LABEL_EXT, index_name

# Fixed header fields keep the tar bytes identical between runs (resume == clean run).
MTIME = 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file that hashes every byte on its way to disk (all tarfile needs)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()


class ShardWriter:
    """Appends samples to `<dir>/<tar_name>.tmp`; `publish()` seals and renames it."""

    def __init__(self, directory: Path, tar_name: str) -> None:
        self.directory = Path(directory)
        self.tar_path = self.directory / tar_name
        self.idx_path = self.directory / index_name(tar_name)
        self._tmp = self.tar_path.with_name(tar_name + ".tmp")
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._index = IndexBuilder()
        self.samples = 0
        self.sha256: str | None = None  # hex digest of the tar, set by publish()

    @property
    def nbytes(self) -> int:
        return self._tar.offset

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MTIME, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # TarInfo.offset_data is not set in write mode: the data ends at tar.offset, padded.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self._index.add(name, self._tar.offset - padded, len(data))

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        self._add(f"{key}.{IMAGE_EXT}", jpeg)
        self._add(f"{key}.{LABEL_EXT}", str(label).encode())
        self.samples += 1

    def publish(self) -> int:
        """Finish the tar, write the index, fsync both, rename into place; returns tar bytes
        (and sets `sha256`)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self.sha256 = self._file.sha256.hexdigest()
        idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        with open(idx_tmp, "wb") as f:
            f.write(self._index.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(idx_tmp, self.idx_path)
        os.replace(self._tmp, self.tar_path)
        fsync_dir(self.directory)
        return size

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
