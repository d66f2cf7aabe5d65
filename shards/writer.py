"""Write one shard: tar, its DALI index and its sha256 in the same pass, published atomically.

Both files are written as `*.tmp` and fsynced (`seal`), then renamed index first, then tar
(`publish`): a reader that sees `shard-N.tar` also sees its `shard-N.idx`, and a crash
leaves only `*.tmp` files. The packer commits a local shard's journal record between the
two, so every tar under its final name has its record. The
tar's sha256 (shards.parquet) is taken from the bytes as they are written: no second read.

The tar members of a sample (`<key>.jpg`, `<key>.cls`) are built where the image is encoded
(`sample_blob`, in a pool worker): a tar header holds no offset, so the single writer only
appends ready bytes, hashes them and notes the index entries. The bytes are those `tarfile`
writes (PAX format, fixed header fields), so re-runs and resumed runs give identical tars.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from shards.index import IndexBuilder
from shards.layouts import IMAGE_EXT, LABEL_EXT, index_name

# Fixed header fields keep the tar bytes identical between runs (resume == clean run).
MTIME = 0
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ustar_header(name: bytes, size: int) -> bytes:
    """The header `tarfile` writes for a regular file with an ASCII name of at most 100 bytes
    (PAX format needs no extended header then): built directly, ~10x faster than `tobuf`."""
    head = b"".join((name, b"\0" * (100 - len(name)), b"0000644\0", b"0000000\0", b"0000000\0",
                     b"%011o\0" % size, b"%011o\0" % MTIME, b" " * 8, tarfile.REGTYPE, b"\0" * 100,
                     tarfile.POSIX_MAGIC, b"\0" * 64, b"\0" * 16, b"\0" * 155, b"\0" * 12))
    checksum = b"%06o\0" % (sum(head))  # the 8 spaces stand in for the checksum field, as tarfile counts it
    return head[:148] + checksum + head[155:]


def tar_member(name: str, data: bytes) -> tuple[bytes, int]:
    """(header + data + padding, length of the header) of one regular-file member, as
    `tarfile` (PAX format) writes it."""
    if name.isascii() and len(name) <= 100 and len(data) < 8 ** 11:
        header = _ustar_header(name.encode("ascii"), len(data))
    else:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MTIME, 0o644
        header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return header + data + b"\0" * (-len(data) % _BLOCK), len(header)


def sample_blob(key: str, jpeg: bytes, label: int) -> tuple[bytes, tuple[tuple[str, int, int], ...]]:
    """The tar bytes of one sample and its members' (name, data offset in the bytes, size)."""
    parts, members, offset = [], [], 0
    for name, data in ((f"{key}.{IMAGE_EXT}", jpeg), (f"{key}.{LABEL_EXT}", str(label).encode())):
        blob, header = tar_member(name, data)
        parts.append(blob)
        members.append((name, offset + header, len(data)))
        offset += len(blob)
    return b"".join(parts), tuple(members)


class ShardWriter:
    """Appends samples to `<dir>/<tar_name>.tmp`; `publish()` seals and renames it."""

    def __init__(self, directory: Path, tar_name: str) -> None:
        self.directory = Path(directory)
        self.tar_path = self.directory / tar_name
        self.idx_path = self.directory / index_name(tar_name)
        self._tmp = self.tar_path.with_name(tar_name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._index = IndexBuilder()
        self.nbytes = 0  # tar bytes so far
        self.samples = 0
        self.sha256: str | None = None  # hex digest of the tar, set by publish()

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._file.write(data)
        self.nbytes += len(data)

    def add_blob(self, blob: bytes, members: tuple[tuple[str, int, int], ...]) -> None:
        """Append one sample's tar bytes (`sample_blob`)."""
        for name, offset, size in members:
            self._index.add(name, self.nbytes + offset, size)
        self._write(blob)
        self.samples += 1

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        self.add_blob(*sample_blob(key, jpeg, label))

    def finish(self) -> int:
        """Write the end of the archive; returns the tar's bytes and sets `sha256` (no disk
        wait: `sync` then makes it durable, possibly on another thread)."""
        self._write(b"\0" * (2 * _BLOCK))  # end-of-archive, then padding to a whole record
        self._write(b"\0" * (-self.nbytes % _RECORD))
        self.sha256 = self._sha.hexdigest()
        return self.nbytes

    def sync(self) -> None:
        """fsync the finished tar and write the index beside it, fsynced (both temp files)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self._idx_tmp, "wb") as f:
            f.write(self._index.to_bytes())
            f.flush()
            os.fsync(f.fileno())

    def seal(self) -> int:
        """`finish` and `sync`: the tar and index as fsynced temp files; returns the tar's
        bytes (and sets `sha256`). `publish` then renames them into place."""
        size = self.finish()
        self.sync()
        return size

    def publish(self) -> int:
        """Rename the sealed index, then the tar, into place (sealing them first if needed)."""
        if self.sha256 is None:
            self.seal()
        elif not self._file.closed:
            self.sync()
        os.replace(self._idx_tmp, self.idx_path)
        os.replace(self._tmp, self.tar_path)
        fsync_dir(self.directory)
        return self.nbytes

    def discard(self) -> None:
        """Remove the unfinished tar (after an error: a full disk gets its space back)."""
        try:
            if not self._file.closed:
                self._file.close()
        except OSError:
            pass  # the buffered tail could not be written (disk full): the file goes anyway
        self._tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
